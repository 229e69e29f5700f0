"""Recaptioning: new shards that keep every member and add scored synthetic captions, resumable, split over
ranks, and CapFilt's filter rule."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from capdiff.cli import main as capdiff_main
from capdiff.data.decode import CaptionKey, decode_captions
from capdiff.data.streams import DecodeSpec, decode_sample
from capdiff.data.transforms import as_unit
from capdiff.evaluation.generation import image_text_scores
from capdiff.recaption import Decoding, FilterRule, Recaptioner, filter_captions, filter_shards, recaption
from tests.helpers import image_bytes, write_tar

THRESHOLD_RULE = FilterRule("both", threshold=20.0)


class Touch:
    """A pickle that, if it were ever loaded, would leave a file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_inputs(folder: Path, count: int = 3, marker: Path | None = None) -> list[str]:
    """`count` shards of 3 samples: the first sample of each also has a .pickle and a .json, the second an
    upper-case .PNG; shard 1 has an undecodable image too, and shard 0 a member outside any sample."""
    urls = []
    for shard in range(count):
        members: list[tuple[str, bytes]] = []
        for i in range(3):
            key = f"s{shard}-{i}"
            members.append((f"{key}.{'PNG' if i == 1 else 'png'}", image_bytes(color=(40 * shard, 70 * i, 150))))
            members.append((f"{key}.txt", f" a  picture of\nsample {key} ".encode()))
            if i == 0:
                members.append((f"{key}.pickle", pickle.dumps(Touch(marker or folder / "unpickled"))))
                members.append((f"{key}.json", json.dumps({"source": "web", "width": 40}).encode()))
        if shard == 1:
            members += [(f"s{shard}-bad.png", b"not a png"), (f"s{shard}-bad.txt", b"a caption")]
        if shard == 0:
            members.append(("LICENSE", b"the shard's own licence text"))
        urls.append(str(write_tar(folder / f"shard-{shard:03d}.tar", members)))
    return urls


def members(path: Path | str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def records(path: Path | str) -> dict[str, dict]:
    return {name.split(".")[0]: json.loads(data) for name, data in members(path).items() if name.endswith(".json")}


@pytest.fixture(scope="module")
def recaptioner(trained_checkpoint: Path) -> Recaptioner:
    from capdiff.pipeline import Pipeline

    model = Pipeline.from_checkpoint(trained_checkpoint, device="cpu").model
    return Recaptioner(model, Decoding(num_beams=2, num_candidates=2, max_new_tokens=6))


@pytest.fixture(scope="module")
def recaptioned(recaptioner: Recaptioner, tmp_path_factory: pytest.TempPathFactory):
    """Three shards recaptioned once for the module: (input urls, output folder, summary)."""
    folder = tmp_path_factory.mktemp("recaption")
    urls = write_inputs(folder / "in")
    summary = recaption(recaptioner, urls, folder / "out", rule=THRESHOLD_RULE, progress=False)
    return urls, folder / "out", summary


def test_recaption_keeps_every_member_and_adds_scored_captions(recaptioned, recaptioner) -> None:
    urls, out, summary = recaptioned
    assert summary.written == ["shard-000.tar", "shard-001.tar", "shard-002.tar"] and not summary.failed
    assert summary.samples == 10 and summary.skipped == {"undecodable_image": 1}  # counted as training counts it
    assert not (Path(urls[0]).parent / "unpickled").exists()  # the .pickle members were copied, never loaded
    for url in urls:
        before, after = members(url), members(out / Path(url).name)
        keys = {name.split(".")[0] for name in before}
        without_json = {k for k in keys if not k.endswith("-0")} - {"s1-bad", "LICENSE"}  # bad: copied as it was
        assert set(after) - set(before) == {f"{key}.json" for key in without_json}
        for name, data in before.items():  # every original member, same name, same bytes (the json aside)
            assert name.endswith(".json") or after[name] == data, name
        for key, record in records(out / Path(url).name).items():
            assert record["caption_orig"] == f"a picture of sample {key}"
            assert len(record["caption_syn"]) == len(record["score_syn"]) == 2
            scores = [record["score_orig"], *record["score_syn"]]
            assert all(math.isfinite(s) and 0 <= s <= 100 for s in scores)
            assert record["score_syn"] == sorted(record["score_syn"], reverse=True)  # best first
            assert record["caption_filtered"] == THRESHOLD_RULE.kept(record, THRESHOLD_RULE.threshold)
            if key.endswith("-0"):
                assert record["source"] == "web" and record["width"] == 40  # the original json's fields stay
    assert json.loads((out / "recaption.json").read_text())["decoding"]["num_candidates"] == 2
    # training reads the synthetic captions by caption key
    for sample in wds.WebDataset([str(out / "shard-002.tar")], shardshuffle=False):
        syn = [c for c in records(out / "shard-002.tar")[sample["__key__"]]["caption_syn"] if c]
        if syn:  # a caption of none but the end token is no caption, as training reads it
            assert decode_captions(sample, CaptionKey.parse("json.caption_syn")) == syn


def test_the_scores_are_the_evaluation_scores_of_each_pair(recaptioned, recaptioner) -> None:
    urls, out, _ = recaptioned
    model = recaptioner.model
    spec = DecodeSpec(model.image_size, CaptionKey.parse("txt"))
    written = records(out / "shard-000.tar")
    for sample in wds.WebDataset([urls[0]], shardshuffle=False):
        pixels = decode_sample(sample, spec, rng=None)["pixels"].permute(2, 0, 1)[None]
        record = written[sample["__key__"]]
        prompts = [record["caption_orig"], *record["caption_syn"]]
        with torch.inference_mode():
            expected = image_text_scores(model, as_unit(pixels).repeat(3, 1, 1, 1), prompts)
        assert expected.tolist() == pytest.approx([record["score_orig"], *record["score_syn"]], abs=1e-3)


def test_a_filter_pass_keeps_the_top_fraction_of_every_shards_scores(recaptioned, tmp_path: Path) -> None:
    _, out, _ = recaptioned
    rule = FilterRule("both", top_fraction=0.5)
    urls = sorted(str(p) for p in out.glob("*.tar"))
    summary = filter_shards(urls, tmp_path / "filtered", rule, progress=False)
    assert summary.skipped == {"not_recaptioned": 1}  # the undecodable sample, copied as it was
    before = [record for url in urls for record in records(url).values()]
    after = [record for url in urls for record in records(tmp_path / "filtered" / Path(url).name).values()]
    assert [r["caption_filtered"] for r in after] == filter_captions(before, rule)
    kept = sum(len(r["caption_filtered"]) for r in after)
    assert kept >= 0.5 * sum(len(rule.candidates(r)) for r in before)
    for url in urls:
        for name, data in members(url).items():
            assert name.endswith(".json") or members(tmp_path / "filtered" / Path(url).name)[name] == data


class StopsAfter:
    """A recaptioner interrupted (as by Ctrl-C or a preempted job) at its call number `calls` + 1."""

    def __init__(self, inner: Recaptioner, calls: int) -> None:
        self.inner, self.calls = inner, calls
        self.model, self.decoding = inner.model, inner.decoding

    def __call__(self, pixels, originals):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.inner(pixels, originals)


def test_an_interrupted_recaption_resumes_without_rewriting_finished_shards(
    recaptioner, recaptioned, tmp_path: Path
) -> None:
    urls, out = write_inputs(tmp_path / "in"), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # one batch per shard: stopped in the third shard
        recaption(StopsAfter(recaptioner, 2), urls, out, rule=THRESHOLD_RULE, batch_size=8, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["recaption.json", "shard-000.tar", "shard-001.tar"]
    (out / "shard-002.tar.tmp-1").write_bytes(b"half a shard")  # left by another rank that was killed
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    summary = recaption(recaptioner, urls, out, rule=THRESHOLD_RULE, batch_size=8, progress=False)
    assert summary.present == ["shard-000.tar", "shard-001.tar"] and summary.written == ["shard-002.tar"]
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done  # never rewritten
    assert sorted(p.name for p in out.iterdir()) == ["recaption.json", *(f"shard-00{i}.tar" for i in range(3))]
    for i in range(3):  # the same shards as one uninterrupted run
        assert records(out / f"shard-00{i}.tar") == records(recaptioned[1] / f"shard-00{i}.tar")
    with pytest.raises(ValueError, match=r"other settings \(filter differ"):
        recaption(recaptioner, urls, out, rule=None, progress=False)


def test_ranks_write_disjoint_shares_of_the_shards(recaptioner, tmp_path: Path) -> None:
    urls, out = write_inputs(tmp_path / "in", count=3), tmp_path / "out"
    written = [recaption(recaptioner, urls, out, rank=r, world_size=2, progress=False).written for r in (0, 1)]
    assert written == [["shard-000.tar", "shard-002.tar"], ["shard-001.tar"]]


@pytest.mark.slow
def test_two_processes_recaption_disjoint_shards(trained_checkpoint: Path, tmp_path: Path) -> None:
    """`python -m capdiff.recaption` under two ranks at once (torchrun's RANK and WORLD_SIZE)."""
    write_inputs(tmp_path / "in", count=5)
    out = tmp_path / "out"
    urls = str(tmp_path / "in/shard-{000..004}.tar")
    command = [sys.executable, "-m", "capdiff.recaption", str(trained_checkpoint), urls, str(out),
               "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    processes = [
        subprocess.Popen(
            command,
            env=os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in processes]
    assert [rc for rc, _, _ in results] == [0, 0], [err for _, _, err in results]
    shares = [{Path(line).name for line in stdout.split()} for _, stdout, _ in results]
    assert shares == [{"shard-000.tar", "shard-002.tar", "shard-004.tar"}, {"shard-001.tar", "shard-003.tar"}]
    assert sorted(p.name for p in out.iterdir()) == ["recaption.json", *(f"shard-00{i}.tar" for i in range(5))]
    assert all(len(records(out / name)) >= 2 for name in shares[0] | shares[1])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--top-fraction", "0.5"], "--top-fraction 0.5: it ranks the scores of the whole data set"),
        (["--num-candidates", "3"], "--num-candidates 3: greedy decoding has one caption per image"),
        (["--filter"], "--filter reads the scores in the shards; leave CKPT out"),
    ],
)
def test_bad_recaption_arguments_are_refused_before_any_work(recaptioned, arguments, message, capsys) -> None:
    urls, out, _ = recaptioned
    status = capdiff_main(["recaption", "model.ckpt", urls[0], str(out.parent / "unused"), *arguments])
    assert status == 2 and message in capsys.readouterr().err
    assert capdiff_main(["recaption", "--filter", urls[0], str(out.parent / "unused")]) == 2
    assert "--filter needs a rule" in capsys.readouterr().err
    assert not (out.parent / "unused").exists()


# ------------------------------------------------------------------------------------------------ the filter rule
KNOWN = [
    {"caption_orig": "a", "score_orig": 30.0, "caption_syn": ["c", "b"], "score_syn": [35.0, 20.0]},
    {"caption_orig": "d", "score_orig": 10.0, "caption_syn": ["e"], "score_syn": [25.0]},
    {"caption_orig": "f", "score_orig": 25.0, "caption_syn": ["f", ""], "score_syn": [25.0, 99.0]},
]


def test_a_threshold_keeps_each_considered_caption_that_reaches_it() -> None:
    assert filter_captions(KNOWN, FilterRule("both", threshold=26)) == [["a", "c"], [], []]
    assert filter_captions(KNOWN, FilterRule("both", threshold=25)) == [["a", "c"], ["e"], ["f"]]  # f once
    assert filter_captions(KNOWN, FilterRule("orig", threshold=26)) == [["a"], [], []]
    assert filter_captions(KNOWN, FilterRule("best_syn", threshold=26)) == [["c"], [], []]  # "" is no caption
    assert filter_captions(KNOWN, FilterRule("best_syn")) == [["c"], ["e"], ["f"]]  # no cut: the best of each


def test_a_top_fraction_keeps_ties_at_the_cut_whatever_the_order() -> None:
    # the candidates of "both" score 35, 30, 25, 25 (e and f), 10
    assert filter_captions(KNOWN, FilterRule("both", top_fraction=0.6)) == [["a", "c"], ["e"], ["f"]]
    assert filter_captions(KNOWN, FilterRule("both", top_fraction=0.4)) == [["a", "c"], [], []]
    assert filter_captions(KNOWN[::-1], FilterRule("both", top_fraction=0.6)) == [["f"], ["e"], ["a", "c"]]
    assert filter_captions(KNOWN, FilterRule("orig", top_fraction=0.5)) == [["a"], [], ["f"]]  # 30, 25 of 3
    assert filter_captions(KNOWN, FilterRule("both", top_fraction=1.0)) == [["a", "c"], ["d", "e"], ["f"]]
    ties = [{"caption_orig": "", "score_orig": 0.0, "caption_syn": ["x", "y"], "score_syn": [5.0, 5.0]}]
    assert filter_captions(ties, FilterRule("best_syn", top_fraction=0.1)) == [["x"]]  # the first of equal best


def test_contradictory_filter_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="give one of them"):
        FilterRule("both", threshold=20, top_fraction=0.5)
    with pytest.raises(ValueError, match="--keep best: not one of orig, best_syn, both"):
        FilterRule("best")
    with pytest.raises(ValueError, match=r"--top-fraction 0: not in \(0, 1\]"):
        FilterRule(top_fraction=0)
