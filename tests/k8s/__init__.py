"""Deployment tests (Kubernetes, Helm, Docker, hardening). A package, so that its conftest and helper
modules never shadow tests/conftest.py under the plain module name `conftest`."""
