"""Shard members as they are: read in order, grouped into samples by WebDataset's key rule, and written back
under the same names with the same bytes, so a recaptioned shard keeps every member the original had (a
`.pickle`, a `.npy`, a member capdiff never reads) and only its `.json` gains fields."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from capdiff.data.decode import BadSample
from capdiff.data.urls import local_path

# Output shards are compressed as their names say, like the inputs they copy.
_WRITE_MODES = {".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}


@dataclass
class Member:
    info: tarfile.TarInfo
    data: bytes | None  # None: not a regular file (a directory or a link), copied as its header alone


@dataclass
class Sample:
    """Consecutive members that share a key (`dir/name` up to the first dot), as webdataset groups them;
    `key` None for a member outside any sample (no extension, or not a file)."""

    key: str | None
    url: str
    members: list[Member] = field(default_factory=list)

    def decodable(self) -> dict:
        """`{"__key__", "__url__", <extension>: bytes}` with lower-case extensions, as
        `webdataset.tarfile_samples` gives it to `capdiff.data.streams.decode_sample`."""
        sample: dict = {"__key__": self.key, "__url__": self.url}
        for member in self.members:
            if member.data is not None:
                sample[_extension(member.info.name)] = member.data
        return sample

    def json_record(self) -> dict:
        """The `.json` member as an object ({} when the sample has none)."""
        member = self._json_member()
        if member is None:
            return {}
        try:
            record = json.loads(member.data)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadSample("bad_caption", f".json does not parse ({err})") from err
        if not isinstance(record, dict):
            raise BadSample("bad_caption", f".json holds a {type(record).__name__}, not an object to add fields to")
        return record

    def set_json(self, record: dict) -> None:
        """Replace the `.json` member's bytes by `record`, or add a `<key>.json` member after the others."""
        data = json.dumps(record, ensure_ascii=False).encode()
        member = self._json_member()
        if member is None:
            info = copy.copy(self.members[-1].info)  # owner, mode and time of the sample's own members
            info.name, info.type, info.linkname, info.pax_headers = f"{self.key}.json", tarfile.REGTYPE, "", {}
            member = Member(info, b"")
            self.members.append(member)
        member.info = copy.copy(member.info)
        member.info.size = len(data)
        member.info.pax_headers = {k: v for k, v in member.info.pax_headers.items() if k != "size"}
        member.data = data

    def _json_member(self) -> Member | None:
        found = [m for m in self.members if m.data is not None and _extension(m.info.name) == "json"]
        return found[-1] if found else None  # the one decode would read, as a later duplicate wins there too


def _extension(name: str) -> str:
    return (base_plus_ext(name)[1] or "").lower()


def read_samples(url: str) -> Iterator[Sample]:
    """The samples of a shard in order (a local path, `pipe:` or any URL webdataset's `gopen` opens)."""
    stream = wds.gopen(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: Sample | None = None
            for info in tar:
                data = tar.extractfile(info).read() if info.isreg() else None
                key = base_plus_ext(info.name)[0] if data is not None else None
                if current is None or key is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key, url)
                current.members.append(Member(info, data))
            if current is not None:
                yield current
    finally:
        stream.close()


def read_json_records(url: str) -> Iterator[dict]:
    """The `.json` objects of a shard, read without the other members' bytes where the shard is a local file."""
    path = local_path(url)
    if path is None:
        for sample in read_samples(url):
            if sample.key is not None and (record := _record_or_none(sample)) is not None:
                yield record
        return
    with tarfile.open(path, mode="r:*") as tar:
        for info in tar:
            if info.isreg() and _extension(info.name) == "json":
                try:
                    record = json.loads(tar.extractfile(info).read())
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    yield record


def _record_or_none(sample: Sample) -> dict | None:
    try:
        return sample.json_record()
    except BadSample:
        return None


@contextmanager
def shard_writer(path: Path, rank: int) -> Iterator[tarfile.TarFile]:
    """A tar written to `<name>.tmp-<rank>` and renamed to `path` once whole: an interrupted write leaves no
    shard, and no two ranks share a temp name. The temp file goes on any error."""
    temp = path.with_name(f"{path.name}.tmp-{rank}")
    try:
        with tarfile.open(temp, mode=_WRITE_MODES.get(path.suffix, "w")) as tar:
            yield tar
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)


def write_sample(tar: tarfile.TarFile, sample: Sample) -> None:
    for member in sample.members:
        tar.addfile(member.info, None if member.data is None else io.BytesIO(member.data))
