"""The test suite of torch-momentum, a package so that its modules import the shared helpers as
``tests.helpers`` (pytest's default import mode puts the repository root on ``sys.path``)."""
