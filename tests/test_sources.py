"""Images decoded once into a file (model.sources.DecodedImages): what a large project's epochs read."""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import EngineConfig
from model.engine import train_and_score
from model.sources import DecodedImages, DecodedImagesWriter, FileImages, iterate_batches, place
from tests.test_coteaching import FAST, _toy_data


def _written(tmp_path, images: np.ndarray) -> DecodedImages:
    writer = DecodedImagesWriter(tmp_path / "images.u8", image_shape=(images.shape[3], *images.shape[1:3]),
                                 capacity=len(images))
    for image in images:
        writer.append(image)
    return writer.finish()


def test_decoded_images_read_back_as_the_files_decode_in_any_order_and_in_dataloader_workers(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(12, 9, 9, 3), dtype=np.uint8)
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    files = FileImages(paths, image_size=9, channels=3)
    decoded = _written(tmp_path, np.stack([files[i].permute(1, 2, 0).numpy() for i in range(len(files))]))
    assert len(decoded) == 12 and decoded.shape == (12, 3, 9, 9)
    for i in range(12):
        assert torch.equal(decoded[i], files[i]) and decoded[i].dtype == torch.uint8
    part = decoded.select([7, 2, 5])
    assert torch.equal(torch.stack(part.__getitems__([2, 0, 1])), torch.stack([files[5], files[7], files[2]]))
    assert pickle.loads(pickle.dumps(part))._array is None                 # a worker maps the file itself
    batches = [torch.tensor([2, 0]), torch.tensor([1])]
    for workers in (0, 2):
        got = [x for _, x in iterate_batches(part, batches, device=torch.device("cpu"), num_workers=workers)]
        want = [torch.stack([files[[7, 2, 5][int(i)]] for i in idx]).float() / 255 for idx in batches]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    # on a GPU the images move there once when they fit (model.sources.place); the copy, a chunk at a time:
    loaded = part.load(torch.device("cpu"), chunk_bytes=2 * 3 * 9 * 9)
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, torch.stack([files[7], files[2], files[5]]))
    assert place(part, torch.device("cpu")) is part                       # on the CPU it stays streamed
    with pytest.raises(ValueError, match="rows must lie in"):
        DecodedImages(decoded.path, shape=decoded.shape, rows=[12])
    with pytest.raises(ValueError, match="not the"):
        DecodedImages(decoded.path, shape=(13, 3, 9, 9))


def test_training_on_decoded_images_is_training_in_memory(tmp_path):
    images, labels = _toy_data(60)                       # (60, 8, 8, 1) uint8
    config = EngineConfig(**FAST, forget_rate=0.1)
    runs = [train_and_score(source, labels, class_names=["a", "b", "c"], checkpoint_path=tmp_path / f"{i}.pt",
                            config=config, progress_bar=False)
            for i, source in enumerate((images, _written(tmp_path, images)))]
    # the same selections and the same probabilities, up to float summation order (as FileImages)
    np.testing.assert_array_equal(runs[0].lnl_clean_mask, runs[1].lnl_clean_mask)
    np.testing.assert_allclose(runs[0].pred_probs, runs[1].pred_probs, atol=1e-6)
    np.testing.assert_allclose(runs[0].vog_scores, runs[1].vog_scores, atol=1e-6)


def test_a_full_disk_leaves_no_file_and_the_caller_streams_the_image_files_instead(tmp_path, caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    link = tmp_path / "images.u8"
    os.symlink("/dev/full", link)           # every write fails with ENOSPC, as on a full disk
    writer = DecodedImagesWriter(link, image_shape=(3, 32, 32), capacity=100)
    with caplog.at_level(logging.WARNING, logger="model.sources"):
        for _ in range(100):                # 300 KB: past the file object's buffer, so a write fails
            writer.append(np.zeros((32, 32, 3), np.uint8))
        assert writer.finish() is None
    assert "No space left on device" in caplog.text and "decodes the image files again" in caplog.text
    assert not os.path.lexists(link) and os.path.exists("/dev/full")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.sources"):     # no room for it from the start
        writer = DecodedImagesWriter(tmp_path / "big.u8", image_shape=(3, 224, 224), capacity=10**9)
        writer.append(np.zeros((224, 224, 3), np.uint8))
        assert writer.finish() is None
    assert "MB needed" in caplog.text and not (tmp_path / "big.u8").exists()
    writer = DecodedImagesWriter(tmp_path / "small.u8", image_shape=(3, 8, 8), capacity=2)
    with pytest.raises(ValueError, match="expected"):
        writer.append(np.zeros((8, 8, 1), np.uint8))
