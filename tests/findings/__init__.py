"""Tests of biasscope.findings, one module per detector (a package, so that its conftest
does not shadow tests/conftest.py, which other test modules import by name)."""
