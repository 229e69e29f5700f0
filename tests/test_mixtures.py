"""A weighted mixture of training sources (`data.sources`): each sample's source drawn by weight, as reproducible
and resumable as one source, with its own skip counts; and its config checked before any shard is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capdiff.data import ImageTextDataModule
from capdiff.train import instantiate_data
from tests.helpers import compose_config, good_members, image_bytes, write_tar


def source_shards(folder: Path, prefix: str, shards: int = 4, per_shard: int = 6) -> list[str]:
    return [
        str(write_tar(folder / f"{prefix}-{n}.tar", good_members(f"{prefix}{n}-", per_shard))) for n in range(shards)
    ]


def mixture(sources: list[dict], **kwargs) -> ImageTextDataModule:
    kwargs = {"batch_size": 8, "num_workers": 0, "samples_per_epoch": 96, "shuffle_buffer": 8} | kwargs
    return ImageTextDataModule(train_urls=None, val_urls=None, sources=sources, **kwargs)


def epoch_keys(dm: ImageTextDataModule) -> list[list[str]]:
    return [batch["keys"] for batch in dm.train_dataloader()]


@pytest.fixture
def two_sources(shard_dir: Path) -> list[dict]:
    """Sources a (weight 3) and b (weight 1), their keys starting with their names."""
    return [
        {"urls": source_shards(shard_dir, "a"), "weight": 3, "name": "a"},
        {"urls": source_shards(shard_dir, "b"), "weight": 1, "name": "b"},
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_sources_are_drawn_by_weight_the_same_way_every_time(two_sources: list[dict], workers: int) -> None:
    dm = mixture(two_sources, num_workers=workers, samples_per_epoch=480, persistent_workers=False)
    dm.setup()
    first = epoch_keys(dm)
    keys = [k for batch in first for k in batch]
    assert len(keys) == 480
    assert abs(sum(k.startswith("a") for k in keys) / len(keys) - 0.75) < 0.05
    again = mixture(two_sources, num_workers=workers, samples_per_epoch=480, persistent_workers=False)
    again.setup()
    assert epoch_keys(again) == first


@pytest.mark.parametrize(("workers", "trained"), [(0, 5), (2, 4)])
def test_a_mixture_resumed_mid_epoch_yields_exactly_the_batches_the_whole_run_had_left(
    two_sources: list[dict], workers: int, trained: int
) -> None:
    whole = mixture(two_sources, num_workers=workers)
    whole.setup()
    loader = whole.train_dataloader()
    epochs = [[b["keys"] for b in loader] for _ in range(2)]
    resumed = mixture(two_sources, num_workers=workers)
    resumed.load_state_dict({"train_stream": {"epoch": 0, "trained_batches": trained}})  # as from a checkpoint
    resumed.setup()
    loader = resumed.train_dataloader()
    assert [b["keys"] for b in loader] == epochs[0][trained:]
    assert [b["keys"] for b in loader] == epochs[1]  # and the next epoch as the whole run's


def test_each_source_counts_its_own_skipped_samples(shard_dir: Path) -> None:
    # b's shards alternate good and caption-less samples; read in order (shuffle_buffer=1), the n-th good one
    # drawn from b comes after exactly n - 1 bad ones
    members = []
    for i in range(4):
        members += [*good_members("b-", 1, start=i), (f"b-bad{i}.png", image_bytes())]
    noisy = [str(write_tar(shard_dir / f"b-{n}.tar", members)) for n in range(2)]
    sources = [{"urls": source_shards(shard_dir, "a", shards=2), "weight": 1, "name": "clean"},
               {"urls": noisy, "weight": 1, "name": "noisy"}]  # fmt: skip
    dm = mixture(sources, shuffle_buffer=1)
    dm.setup()
    drawn = [k for b in dm.train_dataloader() for k in dm.on_after_batch_transfer(b, 0)["keys"]]
    from_b = sum(k.startswith("b-") for k in drawn)
    assert 0 < from_b < len(drawn)
    assert dm.skipped_by_source == {"clean": {}, "noisy": {"missing_caption": from_b - 1}}
    assert dm.skipped == {"missing_caption": from_b - 1}
    assert dm.skip_table("train")[0] == ["clean", "noisy"]


def test_train_urls_is_one_source(uneven_shards: list[str]) -> None:
    dm = ImageTextDataModule(train_urls=uneven_shards, val_urls=None, samples_per_epoch=None)
    assert [(s.name, s.weight, s.urls_key) for s in dm.sources] == [("source0", 1.0, "data.train_urls")]
    dm.setup()
    assert dm.samples_per_epoch == 80


def test_samples_per_epoch_null_counts_every_source(two_sources: list[dict]) -> None:
    dm = mixture(two_sources, samples_per_epoch=None)
    dm.setup()
    assert dm.samples_per_epoch == 2 * 4 * 6


MISSING = "/nonexistent/{0..3}.tar"  # never opened: the config fails first


@pytest.mark.parametrize(
    ("sources", "match"),
    [
        ([], r"data.sources=\[\] must be a non-empty list"),
        ({"urls": MISSING, "weight": 1}, r"data.sources=.* must be a non-empty list"),
        ([{"urls": MISSING, "weight": 0}], r"data.sources\[0\].weight=0 must be a positive number"),
        ([{"urls": MISSING, "weight": 1}, {"urls": MISSING, "weight": -2}], r"data.sources\[1\].weight=-2"),
        ([{"urls": MISSING, "weight": "3"}], r"data.sources\[0\].weight='3' must be a positive number"),
        ([{"urls": MISSING}], r"data.sources\[0\].weight is not set"),
        ([{"weight": 1}], r"data.sources\[0\].urls is not set"),
        ([{"urls": [], "weight": 1}], r"data.sources\[0\].urls is empty"),
        ([{"urls": MISSING, "weight": 1, "captions": "txt"}], r"data.sources\[0\] has unknown keys \['captions'\]"),
        ([{"urls": MISSING, "weight": 1, "caption_key": "png"}], r"data.sources\[0\].caption_key='png' names an"),
        ([{"urls": MISSING, "weight": 1, "name": "a/b"}], r"data.sources\[0\].name='a/b': use letters"),
        (
            [{"urls": MISSING, "weight": 1, "name": "a"}, {"urls": MISSING, "weight": 1, "name": "a"}],
            r"data.sources\[1\].name='a' is another source's name",
        ),
        (["/data/{0..3}.tar"], r"data.sources\[0\]='/data/\{0..3\}.tar' must be a mapping with urls and weight"),
    ],
)
def test_a_bad_source_fails_at_construction_naming_its_key(sources, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixture(sources)


def test_cached_latents_need_one_caption_key_for_every_source() -> None:
    sources = [{"urls": MISSING, "weight": 1}, {"urls": MISSING, "weight": 1, "caption_key": "json.alt"}]
    with pytest.raises(ValueError, match=r"caption_key='txt', but data.sources\[1\].caption_key='json.alt'"):
        mixture(sources, latents=True)


def test_train_urls_and_sources_together_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data.train_urls and data.sources are both set"):
        ImageTextDataModule(train_urls=MISSING, val_urls=None, sources=[{"urls": MISSING, "weight": 1}])


def test_shard_checks_name_the_source(shard_dir: Path, two_sources: list[dict]) -> None:
    missing = [two_sources[0], {"urls": str(shard_dir / "nope-{0..1}.tar"), "weight": 1}]
    with pytest.raises(FileNotFoundError, match=r"data.sources\[1\].urls: 2 of 2 shards do not exist"):
        mixture(missing).setup()
    other_key = [two_sources[0], two_sources[1] | {"caption_key": "json.caption"}]
    with pytest.raises(ValueError, match=r"data.sources\[1\].caption_key='json.caption' is in none of the first"):
        mixture(other_key).setup()


def test_a_source_reads_its_own_caption_key(shard_dir: Path, two_sources: list[dict]) -> None:
    members = []
    for i in range(6):
        members += [(f"j{i}.png", image_bytes()), (f"j{i}.json", b'{"alt": "from json"}')]
    json_shards = [str(write_tar(shard_dir / f"j-{n}.tar", members)) for n in range(2)]
    dm = mixture([two_sources[0], {"urls": json_shards, "weight": 1, "caption_key": "json.alt"}])
    dm.setup()
    pairs = [(k, c) for b in dm.train_dataloader() for k, c in zip(b["keys"], b["captions"], strict=True)]
    assert any(k.startswith("j") for k, _ in pairs)
    assert all(c == ("from json" if k.startswith("j") else f"caption of {k}") for k, c in pairs)


def test_sources_compose_from_the_command_line(two_sources: list[dict], tmp_path: Path) -> None:
    a, b = (Path(s["urls"][0]).parent / f"{s['name']}-{{0..3}}.tar" for s in two_sources)
    override = f'data.sources=[{{urls:"{a}",weight:3,name:a}},{{urls:"{b}",weight:1}}]'  # as given on the shell
    cfg = compose_config(tmp_path, ["data=webdataset", override, "data.num_workers=0"])
    dm = instantiate_data(cfg.data)
    assert [(s.name, s.weight, len(s.urls)) for s in dm.sources] == [("a", 3.0, 4), ("source1", 1.0, 4)]


# ---------------------------------------------------------------- caption mixtures (data.caption_mix)
def recaptioned_shards(folder: Path, shards: int = 2, per_shard: int = 8) -> list[str]:
    """Samples with two synthetic captions (a list) and the original one, in the json member."""
    urls = []
    for n in range(shards):
        members = []
        for i in range(per_shard):
            record = {"caption_syn": [f"syn A {n}-{i}", f"syn B {n}-{i}"], "caption": f"orig {n}-{i}"}
            members += [(f"r{n}-{i}.png", image_bytes()), (f"r{n}-{i}.json", json.dumps(record).encode())]
        urls.append(str(write_tar(folder / f"r-{n}.tar", members)))
    return urls


def recaptioned(urls: list[str], **kwargs) -> ImageTextDataModule:
    mix = {"json.caption_syn": 0.75, "json.caption": 0.25}
    kwargs = {"batch_size": 8, "num_workers": 0, "samples_per_epoch": 96, "shuffle_buffer": 8,
              "caption_key": "json.caption", "caption_mix": mix} | kwargs  # fmt: skip
    return ImageTextDataModule(train_urls=urls, val_urls=urls, **kwargs)


def epoch_captions(dm: ImageTextDataModule) -> list[list[str]]:
    return [batch["captions"] for batch in dm.train_dataloader()]


def test_caption_mix_draws_each_key_by_its_probability_the_same_way_every_time(shard_dir: Path) -> None:
    urls = recaptioned_shards(shard_dir)
    dm = recaptioned(urls, samples_per_epoch=480)
    dm.setup()
    first = epoch_captions(dm)
    captions = [c for batch in first for c in batch]
    assert abs(sum(c.startswith("orig") for c in captions) / len(captions) - 0.25) < 0.05
    assert {c.split()[1] for c in captions if c.startswith("syn")} == {"A", "B"}  # one of the list, by the rng
    again = recaptioned(urls, samples_per_epoch=480)
    again.setup()
    assert epoch_captions(again) == first
    # validation reads data.caption_key alone
    assert {c.split()[0] for b in dm.val_dataloader() for c in b["captions"]} == {"orig"}


@pytest.mark.parametrize(("workers", "trained"), [(0, 5), (2, 4)])
def test_caption_mix_resumed_mid_epoch_gives_the_captions_the_whole_run_had_left(
    shard_dir: Path, workers: int, trained: int
) -> None:
    urls = recaptioned_shards(shard_dir)
    whole = recaptioned(urls, num_workers=workers, captioner_caption_key="json.caption_syn")
    whole.setup()
    batches = [(b["keys"], b["captions"], b["caption_targets"]) for b in whole.train_dataloader()]
    resumed = recaptioned(urls, num_workers=workers, captioner_caption_key="json.caption_syn")
    resumed.load_state_dict({"train_stream": {"epoch": 0, "trained_batches": trained}})
    resumed.setup()
    assert [(b["keys"], b["captions"], b["caption_targets"]) for b in resumed.train_dataloader()] == batches[trained:]


def test_the_captioner_trains_on_its_own_caption_key(shard_dir: Path) -> None:
    urls = recaptioned_shards(shard_dir)
    dm = recaptioned(urls, captioner_caption_key="json.caption")
    dm.setup()
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert all(t == f"orig {k[1:]}" for k, t in zip(batch["keys"], batch["caption_targets"], strict=True))
    assert any(c.startswith("syn") for c in batch["captions"])  # the generator's, from the mix
    val = next(iter(dm.val_dataloader()))
    assert "caption_targets" not in val  # validation scores against data.caption_key's references
    assert "caption_targets" not in next(iter(recaptioned(urls).train_dataloader()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"caption_mix": {"json.caption_syn": 0.5, "json.caption": 0.3}}, r"data.caption_mix: the probabilities"),
        ({"caption_mix": {"json.caption_syn": 1.2, "json.caption": -0.2}}, r"data.caption_mix.json.caption=-0.2"),
        ({"caption_mix": {}}, r"data.caption_mix=\{\} must map caption keys to probabilities"),
        ({"caption_mix": {"png": 1.0}}, r"data.caption_mix key='png' names an image member"),
        ({"captioner_caption_key": "txt.x"}, r"data.captioner_caption_key='txt.x': only the json member has fields"),
    ],
)
def test_a_bad_caption_mix_fails_at_construction_naming_its_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        recaptioned([MISSING], **kwargs)


def test_caption_keys_missing_from_the_shards_fail_at_start_up(shard_dir: Path) -> None:
    urls = recaptioned_shards(shard_dir)
    with pytest.raises(ValueError, match=r"data.caption_mix='json.nope' is in none of the first"):
        recaptioned(urls, caption_mix={"json.nope": 0.5, "json.caption": 0.5}).setup()
    with pytest.raises(ValueError, match=r"data.captioner_caption_key='json.alt' is in none of the first"):
        recaptioned(urls, captioner_caption_key="json.alt").setup()


def test_the_caption_loss_reads_the_captioner_targets(smoke_cfg) -> None:
    from tests.test_module import build

    model, batch = build(smoke_cfg())
    model.eval()  # no dropout: the passes differ only in their caption targets

    def losses(targets: list[str] | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same posterior draw of the latents each time
        return model.losses(batch if targets is None else batch | {"caption_targets": targets}, "val")

    plain, same, other = losses(None), losses(batch["captions"]), losses(["a blue square"] * len(batch["captions"]))
    torch.testing.assert_close(same["caption_loss"], plain["caption_loss"])
    assert not torch.isclose(other["caption_loss"], plain["caption_loss"])
    torch.testing.assert_close(other["diffusion_loss"], plain["diffusion_loss"])  # the generator's: the captions


# ---------------------------------------------------------------- what else reads the mixture
def test_the_tokenizer_is_built_on_each_sources_captions_by_its_weight(shard_dir: Path) -> None:
    """The built tokenizer (model.llm.build_tokenizer) reads every source with its own caption key, each its
    weight's share of the captions."""
    from capdiff.artifacts import training_captions

    plain = source_shards(shard_dir, "t", shards=2, per_shard=20)  # txt: "caption  of\nt0-00000 "
    sources = [{"urls": plain, "weight": 1}, {"urls": recaptioned_shards(shard_dir), "weight": 3,
                                             "caption_key": "json.caption"}]  # fmt: skip
    captions = list(training_captions(mixture(sources), limit=16))
    assert sum(c.startswith("caption") for c in captions) == 4
    assert sum(c.startswith("orig") for c in captions) == 12


def test_latent_caching_from_a_run_folder_reads_every_source(shard_dir: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from capdiff.data.cache_latents import _from_config

    a, b = "/data/a-{0..3}.tar", "/data/b-{0..1}.tar"
    sources = f'data.sources=[{{urls:"{a}",weight:3}},{{urls:"{b}",weight:1}}]'
    cfg = compose_config(tmp_path, ["data=webdataset", sources, "data.val_urls=/data/val.tar"])
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    assert _from_config(tmp_path)["urls"] == [a, b, "/data/val.tar"]


def test_evaluation_drops_the_mixture_of_the_run_it_evaluates(tmp_path: Path) -> None:
    """evaluate.py reads the validation shards alone: a run's data.sources are neither opened nor required."""
    from capdiff.evaluate import follow_run

    cfg = compose_config(tmp_path, ["data=webdataset", 'data.sources=[{urls:"/gone/{0..3}.tar",weight:1}]',
                                    "data.val_urls=/data/val.tar"])  # fmt: skip
    follow_run(cfg, None, int(cfg.data.image_size), None)
    assert cfg.data.sources is None and cfg.data.train_urls is None
    dm = instantiate_data(cfg.data)
    assert dm.sources == [] and dm.val_urls == ["/data/val.tar"]
