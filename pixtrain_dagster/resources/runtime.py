"""Where and how ML work runs: device, experiment tracking, model hub access."""

import os
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from ..core.settings import RuntimeSettings


class TrainingRuntimeResource(ConfigurableResource):
    """Device and Weights & Biases settings for the ML steps."""

    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto picks CUDA when visible.")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        default="auto", description="auto: online when WANDB_API_KEY is set, else offline (files only)."
    )
    wandb_project: str = Field(default="pixtrain", description="W&B project the training runs log to.")
    wandb_dir: str | None = Field(default=None, description="Defaults to WANDB_DIR, else .pixtrain/wandb.")

    def settings(self) -> RuntimeSettings:
        mode = self.wandb_mode
        if mode == "auto":
            # wandb reads the key from the environment itself; we only check that it is there.
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        return RuntimeSettings(
            device=self.device,
            wandb_mode=mode,
            wandb_project=self.wandb_project,
            wandb_dir=self.wandb_dir or os.environ.get("WANDB_DIR") or ".pixtrain/wandb",
        )


class ModelHubResource(ConfigurableResource):
    """Access to a model hub. The token is read from the environment when needed, never stored in config."""

    token_env_var: str = Field(default="HF_TOKEN", description="Name of the variable holding the hub token.")
    cache_dir: str | None = Field(default=None, description="Download cache; defaults to HF_HOME.")

    def token(self) -> str | None:
        return os.environ.get(self.token_env_var) or None
