"""Training metadata store tests. A package, so that its conftest is imported as ``metadata.conftest`` and
does not replace ``tests/conftest.py`` as the module ``conftest`` that other test files import from."""
