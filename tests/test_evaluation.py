"""Evaluation: metric maths against direct computations, the shapes checks, caching, and evaluate.py's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import linalg

from capdiff.data.shapes import TEMPLATES
from capdiff.data.transforms import unit_to_uint8
from capdiff.evaluation.callback import PeriodicEval
from capdiff.evaluation.images import (
    ImageDistances,
    load_real_features,
    metric_names,
    real_stats_key,
    save_real_features,
)
from capdiff.evaluation.retrieval import retrieval_recall
from capdiff.evaluation.shapes import ShapesProbe, attribute_accuracy, parse_caption
from capdiff.evaluation.text import caption_scores, cider_d
from capdiff.train import train
from tests.helpers import ScalarModule, run_entry_point

ATTRS = {"shape": "triangle", "color": "orange", "size": "small", "position": "bottom right", "background": "gray"}


def _direct_fid(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _direct_kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel (x·y/d + 1)³ (Bińkowski et al., 2018)."""
    d = real.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    m = real.shape[0]
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_fid_and_kid_match_a_direct_computation_on_known_features() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    fake = torch.randn(200, 8, generator=gen, dtype=torch.float64) * 1.3 + 0.4
    distances = ImageDistances("probe", 8, kid_subset_size=200)
    for chunk in real.split(64):
        distances.update(chunk, real=True)
    for chunk in fake.split(50):
        distances.update(chunk, real=False)
    scores = distances.compute()
    assert scores["fd_probe"] == pytest.approx(_direct_fid(real.numpy(), fake.numpy()), rel=1e-6)
    # One subset of the whole sample: KID is exactly the unbiased MMD² of the two sets.
    assert scores["kd_probe"] == pytest.approx(_direct_kid(real.numpy(), fake.numpy()), rel=1e-6)
    assert metric_names("inception") == ("fid_inception", "kid_inception")
    assert metric_names("clip") == ("fd_clip", "kd_clip")


def test_uint8_conversion_clamps_and_rounds() -> None:
    pixels = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 1.2])
    assert unit_to_uint8(pixels).tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert unit_to_uint8(pixels).dtype == torch.uint8


def test_real_features_cache_round_trip_and_key_invalidation(tmp_path: Path) -> None:
    base = {"urls": ["a.tar"], "split": "val", "feature": "probe", "extractor_id": "probe-v1", "resolution": 32}
    key = real_stats_key(**base, count=64)
    assert real_stats_key(**base, count=64) == key
    changed = [
        real_stats_key(**(base | {"urls": ["b.tar"]}), count=64),
        real_stats_key(**(base | {"split": "train"}), count=64),
        real_stats_key(**(base | {"feature": "clip"}), count=64),
        real_stats_key(**(base | {"extractor_id": "other"}), count=64),
        real_stats_key(**(base | {"resolution": 64}), count=64),
        real_stats_key(**base, count=128),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    assert load_real_features(tmp_path, key) is None
    features = torch.randn(5, 3)
    save_real_features(tmp_path, key, {"features": features})
    assert torch.equal(load_real_features(tmp_path, key)["features"], features)
    assert not list(tmp_path.glob("*.partial"))


def test_cider_d_on_known_examples() -> None:
    # A caption equal to its only reference, whose n-grams no other image's references share: cosine 1 for
    # every n-gram order it has and no length penalty. CIDEr-D averages n = 1..4 and scales by 10, so a
    # 4-word caption scores 10 and a 3-word one (no 4-grams) 7.5.
    refs = [["a red circle"], ["the blue square here"]]
    _, per_image = cider_d(["a red circle", "the blue square here"], refs)
    assert per_image == pytest.approx([7.5, 10.0])
    # By hand: "a" is in both images' references, so its idf is 0; every other n-gram has idf log 2.
    # "a red square" vs "a red circle": unigrams {red, square}·{red, circle} -> cos 1/2; bigrams
    # {a red, red square}·{a red, red circle} -> 1/2; trigrams no overlap; no 4-grams. 10 * (1/2 + 1/2) / 4.
    refs = [["a red circle"], ["a blue square"]]
    total, per_image = cider_d(["a red square", "a blue square"], refs)
    assert per_image == pytest.approx([2.5, 7.5])
    assert total == pytest.approx(5.0)


def test_caption_scores_are_perfect_for_exact_captions_and_lower_otherwise() -> None:
    refs = [["a red circle in the top left"], ["a blue square in the center"], ["a green triangle at the bottom"]]
    exact = caption_scores([r[0] for r in refs], refs)
    assert exact["bleu4"] == pytest.approx(1.0) and exact["rougeL"] == pytest.approx(1.0)
    worse = caption_scores(["a red square in the center", "a circle", "green"], refs)
    assert all(worse[k] < exact[k] for k in exact)


def test_retrieval_recall_on_constructed_embeddings() -> None:
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 are swapped
    scores = retrieval_recall(images, texts, ks=(1, 2))
    assert scores["i2t_r@1"] == pytest.approx(0.5) and scores["t2i_r@1"] == pytest.approx(0.5)
    texts = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    scores = retrieval_recall(images, texts, ks=(1, 2))
    # Each image's best text is its own; but text 1 is closer to image 0 than to image 1.
    assert scores["i2t_r@1"] == pytest.approx(1.0)
    assert scores["t2i_r@1"] == pytest.approx(0.75) and scores["t2i_r@2"] == pytest.approx(1.0)


def test_captions_in_every_template_parse_to_their_attributes() -> None:
    for template in TEMPLATES:
        assert parse_caption(template.format(**ATTRS)) == ATTRS
    assert parse_caption("a blue circle") == {
        "shape": "circle",
        "color": "blue",
        "size": None,
        "position": None,
        "background": None,
    }
    scores = attribute_accuracy([ATTRS, ATTRS | {"shape": "circle"}], [ATTRS, ATTRS])
    assert scores["shape"] == 0.5 and scores["color"] == 1.0 and scores["all"] == 0.5


def test_probe_reads_uint8_images_at_any_size() -> None:
    probe = ShapesProbe(image_size=32)
    out = probe(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert {k: v.shape[-1] for k, v in out.items()} == {
        "shape": 3,
        "color": 6,
        "size": 2,
        "position": 5,
        "background": 9,
    }
    assert probe.features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 128)


def test_evaluate_writes_every_file_in_its_format_and_reuses_real_features(
    smoke_cfg, smoke_root: Path, tmp_path: Path
) -> None:
    train(smoke_cfg())
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = [
        f"ckpt_path={checkpoint}",
        "data.shapes.num_train=256",
        "data.shapes.num_val=16",
        "data.num_workers=0",
        "eval.num_samples=12",
        "eval.steps=2",
        "eval.batch_size=8",
    ]
    done = run_entry_point("evaluate.py", smoke_root, tmp_path / "eval", *common, "eval.guidance_scales=[1,3]")
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "eval"
    report = json.loads((out / "metrics.json").read_text())
    metrics, settings = report["metrics"], report["settings"]
    expected = {"val/loss", "bleu4", "rougeL", "cider_d", "i2t_r@1", "t2i_r@10", "fd_probe", "kd_probe"}
    expected |= {"caption_attr/mean", "probe_attr/mean", "probe_attr/shape", "capdiff_image_text_score"}
    assert expected <= set(metrics)
    assert "clip_score" not in metrics  # no CLIP configured: the model's own score, under its own name
    assert settings["guidance_scales"] == [1.0, 3.0] and settings["fid_feature"] == "probe"
    assert settings["steps"] == 2 and settings["num_samples"] == 12 and "torchmetrics" in settings["versions"]
    assert [row["guidance_scale"] for row in metrics["guidance_sweep"]] == [1.0, 3.0]
    assert (out / "guidance_curve.png").is_file() and (out / "guidance_sweep.md").is_file()

    index = [json.loads(line) for line in (out / "samples" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 2 * 12
    for line in index:
        assert set(line) == {"prompt", "seed", "guidance_scale", "file"}
        assert (out / "samples" / line["file"]).is_file()
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 12 and all(set(c) == {"key", "reference", "generated"} for c in captions)
    assert (out / "grid_g1.png").is_file() and (out / "grid_g3.png").is_file()

    cached = list((smoke_root / "data" / "real_features").glob("*.pt"))
    assert len(cached) == 1
    # Same data, extractor and count: the real features come from the cache, and the same seeds give the same
    # generations, so the distance at guidance 1 is the first run's.
    again = run_entry_point("evaluate.py", smoke_root, tmp_path / "eval2", *common, "eval.guidance_scale=1")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "real-image features from the cache" in again.stderr + again.stdout
    second = json.loads((tmp_path / "eval2" / "metrics.json").read_text())["metrics"]
    assert second["fd_probe"] == pytest.approx(metrics["guidance_sweep"][0]["fd_probe"], rel=1e-5)
    assert len(list((smoke_root / "data" / "real_features").glob("*.pt"))) == 1


def test_a_bad_prompts_file_fails_before_any_work(smoke_root: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"text": "no prompt key"}\n')
    fake_ckpt = tmp_path / "x.ckpt"
    fake_ckpt.write_bytes(b"")
    done = run_entry_point(
        "evaluate.py", smoke_root, tmp_path / "eval", f"ckpt_path={fake_ckpt}", f"eval.prompts={prompts}"
    )
    assert done.returncode != 0
    assert "line 2" in done.stderr and '"prompt"' in done.stderr


def test_clip_score_with_a_tiny_clip_saved_to_a_folder(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    from capdiff.evaluation.images import clip_score_metric, truncate_for_clip
    from capdiff.models.tokenizer import build_byte_bpe

    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        build_byte_bpe(["a red circle on a blue square"] * 20, tmp_path / "tok", 300)
    )
    end = tokenizer.eos_token_id
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": end, "bos_token_id": end}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip.save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")

    metric = clip_score_metric(str(tmp_path / "clip"))
    long = " ".join(["a red circle on a blue square"] * 10)
    prompts = truncate_for_clip(metric, ["a red circle", long])
    assert prompts[0] == "a red circle"
    assert len(tokenizer(prompts[1], add_special_tokens=False)["input_ids"]) <= 14 < len(tokenizer(long)["input_ids"])
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    metric.update(pixels, prompts)
    score = float(metric.compute())
    # CLIPScore = 100 · max(cos(image, text), 0), averaged: check against the model directly.
    processor = CLIPProcessor.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        image = clip.get_image_features(**processor(images=list(pixels), return_tensors="pt")).pooler_output
        ids = processor(text=prompts, return_tensors="pt", padding=True)
        text_features = clip.get_text_features(ids["input_ids"], ids["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text_features)
    assert score == pytest.approx(float((100 * cosine).clamp(min=0).mean()), rel=1e-4)


def test_clip_and_dinov2_feature_spaces_from_tiny_saved_models(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from capdiff.evaluation.images import build_extractor

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **small)
    ).save_pretrained(tmp_path / "clip")
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, **small)).save_pretrained(tmp_path / "dino")
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)  # any size: resized to the model's
    for feature, folder, width in (("clip", "clip", 16), ("dinov2", "dino", 32)):
        extractor = build_extractor(feature, str(tmp_path / folder), None, probe=lambda: None)
        features = extractor(images)
        assert features.shape == (3, width) == (3, extractor.num_features)
        distances = ImageDistances(feature, extractor.num_features, kid_subset_size=3)
        distances.update(features, real=True)
        distances.update(extractor(255 - images), real=False)
        assert set(distances.compute()) == {f"fd_{feature}", f"kd_{feature}", f"kd_{feature}_std"}
    with pytest.raises(ValueError, match=r"eval\.fid\.name_or_path"):
        build_extractor("clip", None, None, probe=lambda: None)
    with pytest.raises(ValueError, match="not a feature space"):
        build_extractor("vgg", None, None, probe=lambda: None)


def test_evaluation_samples_under_the_trainers_precision(smoke_cfg, smoke_root: Path, tmp_path: Path, monkeypatch):
    import capdiff.evaluate as evaluate_module
    from tests.helpers import compose_config

    train(smoke_cfg("callbacks.sample_grid=null", "callbacks.periodic_eval=null"))
    dtypes: set[torch.dtype] = set()
    load = evaluate_module.load_checkpoint

    def load_and_watch(*args, **kwargs):
        model, used_ema = load(*args, **kwargs)
        model.diffusion.unet.register_forward_hook(lambda module, inputs, output: dtypes.add(output.sample.dtype))
        return model, used_ema

    monkeypatch.setattr(evaluate_module, "load_checkpoint", load_and_watch)
    overrides = [
        f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"paths.output_dir={tmp_path / 'eval'}",
        "data.shapes.num_train=256", "data.shapes.num_val=16", "data.num_workers=0", "eval.num_samples=2",
        "eval.steps=2", "eval.probe=false", "eval.fid.feature=null", "trainer.precision=bf16-mixed",
    ]  # fmt: skip
    metrics = evaluate_module.evaluate(compose_config(smoke_root, overrides, config="evaluate"))
    assert dtypes == {torch.bfloat16}  # the validation losses and the generations alike
    assert metrics["num_validation"] == 2


class _Counted(PeriodicEval):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps_run: list[int] = []

    def run(self, trainer, pl_module) -> None:
        self.steps_run.append(trainer.global_step)


def test_periodic_evaluation_runs_once_per_optimizer_step_under_accumulation(tmp_path: Path) -> None:
    """Every micro-batch of an accumulated step ends with the same global_step: the evaluation of step N runs
    once, and the end of training does not repeat the last step's; a resumed run does not redo its first step's."""

    def fit(max_steps: int, callback: _Counted, ckpt_path=None) -> pl.Trainer:
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=4, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[callback], enable_checkpointing=False)  # fmt: skip
        trainer.fit(ScalarModule(), torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2), ckpt_path=ckpt_path)
        return trainer

    first = _Counted(every_n_steps=2)
    trainer = fit(6, first)
    assert first.steps_run == [2, 4, 6]
    trainer.save_checkpoint(tmp_path / "at6.ckpt")
    resumed = _Counted(every_n_steps=2)
    fit(7, resumed, tmp_path / "at6.ckpt")
    assert resumed.steps_run == [7]  # step 6 was evaluated by the run it continues; the end of training: 7


def test_retrieval_recall_agrees_with_torchmetrics_in_chunks() -> None:
    from torchmetrics.retrieval import RetrievalRecall

    torch.manual_seed(0)
    images, texts = torch.randn(50, 8), torch.randn(50, 8)
    texts[:25] += 2 * images[:25]  # half the pairs findable
    ours = retrieval_recall(images, texts, chunk=7)
    sim = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    target, queries = torch.eye(50, dtype=torch.bool).flatten(), torch.arange(50).repeat_interleave(50)
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        for k in (1, 5, 10):
            reference = float(RetrievalRecall(top_k=k)(scores.flatten(), target, indexes=queries))
            assert ours[f"{direction}_r@{k}"] == pytest.approx(reference)
    assert 0 < ours["i2t_r@1"] < 1


def test_features_are_float32_inside_and_outside_the_trainers_autocast() -> None:
    """Real images are read inside the evaluation step (under bf16-mixed's autocast), generated ones after it:
    the feature network runs in float32 for both, so FID compares like with like."""
    from capdiff.evaluation.images import FullPrecision

    class Net(torch.nn.Module):
        num_features = 4

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(12, 4)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.linear(images.float().flatten(1) / 255)

    torch.manual_seed(0)
    net = FullPrecision(Net())
    images = torch.randint(0, 256, (3, 3, 2, 2), dtype=torch.uint8)
    outside = net(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = net(images)
        assert net.net(images).dtype == torch.bfloat16  # what autocast does to it unwrapped
    assert inside.dtype == outside.dtype == torch.float32
    torch.testing.assert_close(inside, outside)
