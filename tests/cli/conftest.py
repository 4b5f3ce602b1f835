# Tiny models on a shared 2-core machine: one thread (faster, and deterministic), as in tests/models.
from tests.models.conftest import one_thread  # noqa: F401
