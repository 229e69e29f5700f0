"""Cached VAE latents (`capdiff.data.cache_latents`, `data.latents=true`): round trip, same loss, checks."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL

from capdiff.artifacts import prepare_latents
from capdiff.data.cache_latents import MANIFEST, cache_latents, check_cache, main, vae_fingerprint
from capdiff.data.decode import BadSample, CaptionKey
from capdiff.data.streams import DecodeSpec, collate, decode_sample
from capdiff.data.transforms import as_unit
from capdiff.train import build_datamodule, build_model
from tests.helpers import good_members, write_tar


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_cached_shards_keep_every_member_and_add_the_posterior(tmp_path: Path) -> None:
    shards = [str(write_tar(tmp_path / "in" / f"train-{i}.tar", good_members("s", 5, 5 * i))) for i in range(2)]
    vae = tiny_vae()
    counts = cache_latents(shards, tmp_path / "out", vae, "tiny-vae", image_size=16, batch_size=4)
    assert counts["written"] == 10

    original, cached = members_of(Path(shards[1])), members_of(tmp_path / "out" / "train-1.tar")
    latent_names = {n for n in cached if n.endswith(".latents.npy")}
    assert {n: b for n, b in cached.items() if n not in latent_names} == original
    assert len(latent_names) == 5

    # The stored mean/std are the VAE posterior of the centre crop the training stream decodes.
    spec = DecodeSpec(16, CaptionKey.parse("txt"))
    sample = {"__key__": "s00007", "png": original["s00007.png"], "txt": original["s00007.txt"]}
    pixels = as_unit(collate([decode_sample(sample, spec, rng=None)])["pixels"])
    posterior = vae.encode(pixels).latent_dist
    stored = np.load(io.BytesIO(cached["s00007.latents.npy"]))
    assert stored.shape == (2, 4, 8, 8) and stored.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(stored[0]), posterior.mean[0].detach())
    torch.testing.assert_close(torch.from_numpy(stored[1]), posterior.std[0].detach())

    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["image_size"] == 16 and manifest["latent_shape"] == [4, 8, 8]

    # Reading back: the stream's decode yields the same mean and std.
    latent_spec = DecodeSpec(16, CaptionKey.parse("txt"), latents=True)
    read = decode_sample(sample | {"latents.npy": cached["s00007.latents.npy"]}, latent_spec, rng=None)
    torch.testing.assert_close(read["latent_mean"], posterior.mean[0].detach())
    with pytest.raises(BadSample) as missing:
        decode_sample(sample, latent_spec, rng=None)
    assert missing.value.reason == "missing_latents"
    with pytest.raises(BadSample) as bad:
        decode_sample(sample | {"latents.npy": b"not numpy"}, latent_spec, rng=None)
    assert bad.value.reason == "bad_latents"


class Payload:
    """What a hostile shard hides in a pickle: unpickling it touches `marker` (harmless, and visible)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_cache_built_from_shards_with_pickle_members_never_unpickles_them(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Payload(marker))
    as_pth, as_npy = io.BytesIO(), io.BytesIO()
    torch.save(Payload(marker), as_pth)
    np.save(as_npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    hostile = {"pickle": payload, "pyd": payload, "pth": as_pth.getvalue(), "npy": as_npy.getvalue()}
    members = []
    for name, data in good_members("s", 3):
        members.append((name, data))
        if name.endswith(".txt"):  # each sample carries every hostile member, and a poisoned latents.npy
            key = name.removesuffix(".txt")
            members += [(f"{key}.{ext}", data) for ext, data in hostile.items()]
            members.append((f"{key}.latents.npy", as_npy.getvalue()))
    shard = write_tar(tmp_path / "in" / "train-0.tar", members)

    counts = cache_latents([str(shard)], tmp_path / "out", tiny_vae(), "v", image_size=16)
    assert counts["written"] == 3
    cached = members_of(tmp_path / "out" / "train-0.tar")
    for key in ("s00000", "s00001", "s00002"):
        assert {ext: cached[f"{key}.{ext}"] for ext in hostile} == hostile  # kept byte for byte
        assert np.load(io.BytesIO(cached[f"{key}.latents.npy"]), allow_pickle=False).shape == (2, 4, 8, 8)

    # Training from the cache reads the image, the caption and latents.npy, without pickle.
    spec = DecodeSpec(16, CaptionKey.parse("txt"), latents=True)
    samples = list(wds.tarfile_samples([{"url": str(tmp_path / "out" / "train-0.tar")}]))
    assert [decode_sample(s, spec, rng=None)["latent_mean"].shape for s in samples] == [(4, 8, 8)] * 3
    with pytest.raises(BadSample) as poisoned:
        decode_sample(samples[0] | {"latents.npy": as_npy.getvalue()}, spec, rng=None)
    assert poisoned.value.reason == "bad_latents"
    assert not marker.exists()

    pickle.loads(cached["s00000.pickle"])
    assert marker.exists()  # the kept bytes were armed all along: nothing above unpickled them


def test_each_rank_caches_its_share_and_finished_shards_are_kept(tmp_path: Path) -> None:
    shards = [str(write_tar(tmp_path / "in" / f"train-{i}.tar", good_members("s", 2, 2 * i))) for i in range(4)]
    vae, out = tiny_vae(), tmp_path / "out"
    cache_latents(shards, out, vae, "v", image_size=16, rank=1, world_size=2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-1.tar", "train-3.tar"]
    assert not (out / MANIFEST).exists()  # rank 0 writes it
    mtime = (out / "train-1.tar").stat().st_mtime_ns
    counts = cache_latents(shards, out, vae, "v", image_size=16, rank=0, world_size=1)
    assert counts["written"] == 4  # only the two shards rank 1 had not written
    assert (out / "train-1.tar").stat().st_mtime_ns == mtime
    assert not list(out.glob("*.tmp"))


def test_a_cache_from_another_vae_or_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    shards = [str(write_tar(tmp_path / "in" / "train-0.tar", good_members("s", 2)))]
    cache_latents(shards, tmp_path / "out", tiny_vae(0), "v", image_size=16)
    cached = [str(tmp_path / "out" / "train-0.tar")]
    check_cache(cached, "data.latents_dir", 16, vae_fingerprint(tiny_vae(0)))
    with pytest.raises(ValueError, match=r"another VAE.*cache_latents"):
        check_cache(cached, "data.latents_dir", 16, vae_fingerprint(tiny_vae(1)))
    with pytest.raises(ValueError, match=r"data\.image_size=16"):
        check_cache(cached, "data.latents_dir", 32, vae_fingerprint(tiny_vae(0)))


def test_the_command_line_caches_with_a_saved_vae(tmp_path: Path, capsys) -> None:
    write_tar(tmp_path / "in" / "train-0.tar", good_members("s", 3))
    write_tar(tmp_path / "in" / "train-1.tar", good_members("t", 2))
    tiny_vae().save_pretrained(tmp_path / "vae")
    argv = ["--vae", str(tmp_path / "vae"), "--image-size", "16", "--out", str(tmp_path / "out")]
    assert main([*argv, "--urls", str(tmp_path / "in" / "train-{0..1}.tar")]) == 0
    assert "5 samples cached" in capsys.readouterr().out
    assert (tmp_path / "out" / "train-1.tar").is_file()


def test_training_from_cached_latents_gives_the_same_loss_as_encoding_on_the_fly(smoke_cfg) -> None:
    plain_data = build_datamodule(smoke_cfg())
    model = build_model(smoke_cfg(), plain_data).model
    cached_cfg = smoke_cfg("data.latents=true")
    cached_data = build_datamodule(cached_cfg)
    cache = prepare_latents(cached_cfg, cached_data, build_model(cached_cfg, cached_data).model.diffusion.vae, "vae")
    cache.encode(cached_data, model.diffusion.vae, rank=0, world_size=1, device="cpu")  # what fit's set-up does
    assert cached_data.reading_latents and "latents" in cached_data.train_urls[0]

    plain = next(iter(plain_data.val_dataloader()))
    cached = next(iter(cached_data.val_dataloader()))
    assert plain["keys"] == cached["keys"] and "latent_mean" in cached and "latent_mean" not in plain
    model.train()
    losses = []
    for batch in (plain, cached):
        torch.manual_seed(0)  # the same posterior draw, noise, timesteps and caption dropout
        losses.append(model.losses(batch, "train"))
    for name in ("diffusion_loss", "loss"):
        torch.testing.assert_close(losses[1][name], losses[0][name])


def test_cached_latents_with_random_crops_are_refused(smoke_cfg) -> None:
    with pytest.raises(ValueError, match=r"data\.random_crop=false"):
        build_datamodule(smoke_cfg("data.latents=true", "data.random_crop=true"))
