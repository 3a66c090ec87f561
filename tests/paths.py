"""Where the tests find data that lives beside the repository."""

from pathlib import Path

#: Real images made by Nydus's own builder, in `../shared/fixtures/nydus` next to the checkout.
NYDUS_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nydus"
