"""The one place where warnings that are not ours and harmless are silenced (Dagster layer; the ML libraries'
are in ``pixtrain_dagster.core.warning_filters``).

``install()`` runs when the code location is imported (``pixtrain_dagster.definitions``), which happens in every
process that runs our code: the CLI, ``dagster dev``'s code server, each multiprocess step subprocess and each
Kubernetes step pod. Each filter names one message we trigger; every other Dagster warning stays visible.

``dagster asset materialize`` and ``dagster dev`` warn that the ``dg`` CLI supersedes them before any of our code
is loaded, so that warning is silenced by the Makefile (``DAGSTER_CLI_WARNINGS``) for the commands it runs.
"""

from __future__ import annotations

import warnings

from .core.warning_filters import install_library_filters


def install() -> None:
    from dagster import BetaWarning

    # Output(data_version=...) is how our assets report their content hash as the data version (what lets
    # Dagster skip unchanged downstream work); the parameter has been "beta" for many releases. Ours only.
    warnings.filterwarnings(
        "ignore",
        message=r"Parameter `data_version` of initializer `Output\.__init__`",
        category=BetaWarning,
        module=r"pixtrain_dagster\.",
    )
    # `--select '*'` on the CLI: Dagster's own selection parser calls the beta AssetSelection.all(include_sources).
    warnings.filterwarnings(
        "ignore",
        message=r"Parameter `include_sources` of function `AssetSelection\.all`",
        category=BetaWarning,
        module=r"dagster\._core\.definitions\.antlr_asset_selection\.",
    )
    # Dagster calls its own deprecated InitResourceContext.dagster_run when it configures a nested resource (our
    # IO manager holds the artifact store resource); nothing in our code calls it.
    warnings.filterwarnings(
        "ignore",
        message=r"InitResourceContext\.dagster_run is deprecated",
        category=DeprecationWarning,
        module=r"dagster\._core\.execution\.context\.init$",
    )
    install_library_filters()
