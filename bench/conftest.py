from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


@pytest.fixture(scope="session")
def register_msg() -> bytes:
    """A realistic softphone REGISTER (~700 bytes, two Contact headers)."""
    return (VECTORS / "valid" / "softphone-register.sip").read_bytes()
