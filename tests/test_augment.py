"""Random-shift augmentation: each image moves as a whole, by at most the pad, reproducibly per seed."""

import torch

from pipeline.data.augment import random_shift
from pipeline.train.loop import micro_batch_seed


def test_each_image_is_a_shifted_crop_of_its_padded_self_within_the_pad():
    images = torch.rand(6, 3, 16, 16)
    torch.manual_seed(0)
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    for i in range(6):   # every output is exactly one of the 25 allowed crops of its own image
        crops = [padded[i, :, y:y + 16, x:x + 16] for y in range(5) for x in range(5)]
        assert any(torch.equal(shifted[i], c) for c in crops)
    torch.manual_seed(0)
    assert torch.equal(random_shift(images, 2), shifted)        # the loop seeds it per micro-batch
    assert random_shift(images, 0) is images


def offsets(seed, rank, micro):
    """The shifted images one rank's step draws for micro-batch `micro` (run_steps seeds torch this way)."""
    torch.manual_seed(micro_batch_seed(seed, rank, micro))
    return random_shift(torch.arange(8 * 16 * 16, dtype=torch.float32).view(8, 1, 16, 16), 4)


def test_ranks_draw_different_shifts_for_the_same_micro_batch_and_a_rerun_draws_the_same():
    # Seeded by (run seed, micro-batch) alone, both ranks drew the same offsets for the same step.
    assert not torch.equal(offsets(0, rank=0, micro=5), offsets(0, rank=1, micro=5))
    assert not torch.equal(offsets(0, rank=0, micro=5), offsets(0, rank=0, micro=6))
    assert not torch.equal(offsets(0, rank=0, micro=5), offsets(1, rank=0, micro=5))
    assert torch.equal(offsets(0, rank=1, micro=5), offsets(0, rank=1, micro=5))   # a resumed run replays it
