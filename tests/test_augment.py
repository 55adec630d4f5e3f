"""Random-shift augmentation: each image moves as a whole, by at most the pad, reproducibly per seed."""

import torch

from pipeline.data.augment import random_shift


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
