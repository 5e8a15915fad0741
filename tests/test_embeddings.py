"""Fast mode (model/embeddings.py): a frozen backbone embeds each image once, two heads train on the embeddings."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import EngineConfig
from model.embeddings import EmbeddingCache, FrozenBackbone, embed_images, image_keys
from model.engine import score_images, train_and_score
from model.networks import build_network
from model.sources import FileImages
from selection import metrics

FAST_HEADS = dict(epochs=6, tk=3, vog_window=2, batch_size=32, estimate_epochs=2, finetune_epochs=2,
                  device="cpu", image_size=16, frozen_backbone=True)


def _stripes(n=96, seed=0, size=16):
    """RGB images whose class is which third is bright; a quarter of the labels shifted by one."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    images = np.zeros((n, size, size, 3), np.uint8)
    third = size // 3
    for i, label in enumerate(truth):
        images[i, :, label * third:(label + 1) * third] = 220
    images = np.clip(images + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    given = truth.copy()
    flip = rng.random(n) < 0.25
    given[flip] = (truth[flip] + 1) % 3
    return images, given, truth


def _files_in(cache_root: Path) -> list[Path]:
    return sorted(cache_root.rglob("*.npy"))


def test_fast_mode_trains_heads_scores_and_retrains_from_the_cached_embeddings(tmp_path, caplog):
    images, given, truth = _stripes()
    config = EngineConfig(**FAST_HEADS, embedding_cache_dir=str(tmp_path / "emb"))
    with caplog.at_level(logging.INFO, logger="model.embeddings"):
        first = train_and_score(images, given, class_names=["a", "b", "c"], checkpoint_path=tmp_path / "v1.pt",
                                config=config, progress_bar=False)
    assert f"0 embeddings from the cache, {len(images)} computed" in caplog.text
    assert len(_files_in(tmp_path / "emb")) == len(images)
    assert first.pred_probs.shape == (len(images), 3)
    assert metrics.auroc(first.priority, given != truth) > 0.8

    relabelled = np.argsort(-first.priority)[:10]
    labels, trusted = given.copy(), np.zeros(len(given), bool)
    labels[relabelled], trusted[relabelled] = truth[relabelled], True
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = train_and_score(images, labels, class_names=["a", "b", "c"], trusted_mask=trusted,
                                 previous_checkpoint=tmp_path / "v1.pt", checkpoint_path=tmp_path / "v2.pt",
                                 config=config, progress_bar=False)
    assert f"{len(images)} embeddings from the cache, 0 computed" in caplog.text
    assert "Phase 2: fine-tuning" in caplog.text                 # the heads are fine-tuned, not retrained
    assert np.all(second.priority[trusted] == 0.0)

    # the checkpoint carries the backbone: scoring needs no weights file and no cache
    config_without_cache = EngineConfig(**FAST_HEADS)
    again = score_images(tmp_path / "v2.pt", images[:7], labels[:7], config=config_without_cache)
    np.testing.assert_allclose(again.pred_probs, second.pred_probs[:7], atol=1e-5)


def test_a_changed_image_or_backbone_is_embedded_again_and_only_that(tmp_path):
    images, _, _ = _stripes(n=12)
    config = EngineConfig(**FAST_HEADS, embedding_cache_dir=str(tmp_path / "emb"))
    backbone = FrozenBackbone.build(config, in_channels=3, image_size=16, device=torch.device("cpu"))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    first = embed_images(backbone, tensor, config=config, device=torch.device("cpu"), progress_bar=False)
    changed = tensor.clone()
    changed[5] = 255 - changed[5]
    keys_before, keys_after = image_keys(tensor), image_keys(changed)
    assert [a == b for a, b in zip(keys_before, keys_after)] == [i != 5 for i in range(12)]
    second = embed_images(backbone, changed, config=config, device=torch.device("cpu"), progress_bar=False)
    assert len(_files_in(tmp_path / "emb")) == 13                 # one new file, for image 5 only
    torch.testing.assert_close(second[:5], first[:5])
    assert not torch.allclose(second[5], first[5])

    # other weights = another fingerprint = another cache folder: nothing of the first is reused
    weights = tmp_path / "domain-resnet18.pth"
    torch.manual_seed(123)
    net = build_network("resnet18", num_classes=2, in_channels=3, image_size=224, small_input_stem=False)
    torch.save({f"{k}": v for k, v in net.backbone.state_dict().items()}, weights)
    other = FrozenBackbone.build(EngineConfig(**{**FAST_HEADS, "pretrained_weights": str(weights)}),
                                 in_channels=3, image_size=16, device=torch.device("cpu"))
    assert other.fingerprint != backbone.fingerprint
    embed_images(other, tensor, config=config, device=torch.device("cpu"), progress_bar=False)
    assert len({p.parent.parent for p in _files_in(tmp_path / "emb")}) == 2
    # the same configuration builds the same backbone (random or not): the cache is found again
    assert FrozenBackbone.build(config, in_channels=3, image_size=16,
                                device=torch.device("cpu")).fingerprint == backbone.fingerprint


def test_streamed_files_are_keyed_by_their_bytes_and_a_damaged_cache_file_is_recomputed(tmp_path):
    images, _, _ = _stripes(n=6)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"scan{i}.png")
        Image.fromarray(image).save(paths[-1])
    files = FileImages(paths, image_size=16, channels=3)
    config = EngineConfig(**FAST_HEADS, embedding_cache_dir=str(tmp_path / "emb"))
    backbone = FrozenBackbone.build(config, in_channels=3, image_size=16, device=torch.device("cpu"))
    first = embed_images(backbone, files, config=config, device=torch.device("cpu"), progress_bar=False)
    in_memory = embed_images(backbone, torch.stack([files[i] for i in range(6)]), config=EngineConfig(**FAST_HEADS),
                             device=torch.device("cpu"), progress_bar=False)
    torch.testing.assert_close(first, in_memory)                  # same pixels, same embeddings
    assert image_keys(files) != image_keys(FileImages(paths, image_size=16, channels=3, resize="pad"))

    cache = EmbeddingCache(config.embedding_cache_dir, backbone.fingerprint)
    damaged = cache._path(image_keys(files)[2])
    damaged.write_bytes(b"\x93NUMPY truncated")
    again = embed_images(backbone, files, config=config, device=torch.device("cpu"), progress_bar=False)
    torch.testing.assert_close(again, first)
    assert np.load(damaged).shape == (backbone.embedding_dim,)  # replaced by a whole file


def test_a_full_disk_under_the_cache_costs_the_next_training_time_not_this_training(tmp_path, monkeypatch, caplog):
    import errno

    import model.embeddings as embeddings

    images, _, _ = _stripes(n=10)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    config = EngineConfig(**FAST_HEADS, embedding_cache_dir=str(tmp_path / "emb"))
    backbone = FrozenBackbone.build(config, in_channels=3, image_size=16, device=torch.device("cpu"))
    expected = embed_images(backbone, tensor, config=EngineConfig(**FAST_HEADS), device=torch.device("cpu"),
                            progress_bar=False)

    def disk_full(handle, array, allow_pickle):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(embeddings.np, "save", disk_full)
    with caplog.at_level(logging.WARNING, logger="model.embeddings"):
        got = embed_images(backbone, tensor, config=config, device=torch.device("cpu"), progress_bar=False)
    torch.testing.assert_close(got, expected)
    assert "cannot write the embedding cache" in caplog.text and "No space left" in caplog.text
    assert not list((tmp_path / "emb").rglob("*.npy")) and not list((tmp_path / "emb").rglob("*.tmp"))


def test_switching_fast_mode_on_runs_phase_1_again_with_a_reason(tmp_path, caplog):
    images, given, _ = _stripes(n=60)
    full = EngineConfig(**{**FAST_HEADS, "frozen_backbone": False, "arch": "smallcnn"})
    train_and_score(images, given, class_names=["a", "b", "c"], checkpoint_path=tmp_path / "full.pt",
                    config=full, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        train_and_score(images, given, class_names=["a", "b", "c"], previous_checkpoint=tmp_path / "full.pt",
                        checkpoint_path=tmp_path / "fast.pt", config=EngineConfig(**FAST_HEADS), progress_bar=False)
    assert "trained as a full network" in caplog.text and "running Phase 1 again" in caplog.text


def test_fast_mode_needs_a_resnet_and_the_heads_config_is_internal():
    with pytest.raises(ValueError, match="frozen_backbone needs a ResNet"):
        EngineConfig(frozen_backbone=True, arch="smallcnn")
    heads = EngineConfig(frozen_backbone=True).for_embedding_heads()
    assert heads.arch == "embedding_head" and heads.augment == "none" and not heads.frozen_backbone
    assert EngineConfig(frozen_backbone=True).backbone_arch == "resnet18"
