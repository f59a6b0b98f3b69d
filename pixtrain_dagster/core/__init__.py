"""The ML core: plain Python, no Dagster imports, runnable in any pod. Heavy libraries are imported lazily."""
