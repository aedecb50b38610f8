"""The real trace fixtures travel with the repository, each beside its license and named in the README."""

import hashlib
import re
from pathlib import Path

from tests.helpers import FIXTURES

REPOSITORY = Path(__file__).resolve().parents[2]


def test_fixtures_live_inside_the_repository():
    assert FIXTURES.resolve().is_relative_to(REPOSITORY), FIXTURES
    assert FIXTURES.resolve() == REPOSITORY / "tests" / "fixtures"


def test_every_fixture_has_its_license_and_its_checksum_in_the_readme():
    readme = (FIXTURES / "README.md").read_text()
    listed = dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.MULTILINE))
    files = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file() and p.parent != FIXTURES)
    data_files = [f for f in files if not f.endswith("LICENSE")]
    assert sorted(listed) == data_files
    for folder in {Path(f).parent for f in data_files}:
        assert (FIXTURES / folder / "LICENSE").is_file(), folder
        assert f"`{folder}/`" in readme
    for path, digest in listed.items():
        assert hashlib.sha256((FIXTURES / path).read_bytes()).hexdigest() == digest, path
