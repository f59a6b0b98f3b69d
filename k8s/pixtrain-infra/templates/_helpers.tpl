{{/* Namespace every object of this chart lives in (not the release namespace: see deploy script). */}}
{{- define "pixtrain.namespace" -}}
{{- required "namespace.name is required" .Values.namespace.name -}}
{{- end -}}

{{- define "pixtrain.labels" -}}
app.kubernetes.io/name: pixtrain-infra
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pixtrain
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
pixtrain/environment: {{ .Values.environment | quote }}
{{- end -}}

{{/* Keep data volumes and their namespace when the release is uninstalled. */}}
{{- define "pixtrain.keepAnnotation" -}}
{{- if .Values.storage.keepOnUninstall }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end -}}

{{/* The same hardened contexts as pixtrain_dagster/execution.py (uid 1001, PSS "restricted"). */}}
{{- define "pixtrain.podSecurityContext" -}}
runAsUser: 1001
runAsGroup: 1001
runAsNonRoot: true
fsGroup: 1001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pixtrain.containerSecurityContext" -}}
runAsUser: 1001
runAsGroup: 1001
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
