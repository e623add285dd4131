"""How many images run at once, and what a user reads when not even one fits."""
from __future__ import annotations

import pytest

from lib_layerdiffuse.batch_memory import (
    GIB,
    BatchMemory,
    decoder_cure,
    decoder_memory,
    images_at_once,
    largest_square_side,
)
from lib_layerdiffuse.errors import InputError


def test_images_at_once_follow_the_free_memory_up_to_the_limit():
    memory = BatchMemory(per_image=100, held=1000)
    assert [images_at_once(memory, free, 16, 16, "work", "cure") for free in (1100, 1199, 1300, 2600, 10 ** 9)] == \
        [1, 1, 3, 16, 16]
    assert images_at_once(memory, 10 ** 9, 16, 4, "work", "cure") == 4
    assert images_at_once(memory, 10 ** 9, 3, 16, "work", "cure") == 3


def test_not_even_one_image_says_what_is_needed_and_what_to_do():
    with pytest.raises(InputError, match=r"^work needs about 2\.0 GiB of memory with 4 images in the batch, "
                                         r"but 1\.5 GiB are free: cure$"):
        images_at_once(BatchMemory(per_image=GIB, held=GIB), 3 * GIB // 2, 4, 16, "work", "cure")


def test_decoder_memory_grows_with_pixels_passes_and_precision():
    one = decoder_memory(1024, 1024, 1, 4, 1, True)
    assert decoder_memory(2048, 1024, 1, 4, 1, True).per_image == 2 * one.per_image
    assert decoder_memory(1024, 1024, 1, 4, 8, True).per_image > one.per_image
    assert decoder_memory(1024, 1024, 1, 2, 1, False).per_image < decoder_memory(1024, 1024, 1, 4, 1, False).per_image
    # padded to the decoder's multiple of 64; the results of the whole batch are held in CPU memory
    assert decoder_memory(1000, 1000, 1, 4, 1, True).per_image == one.per_image
    assert decoder_memory(1024, 1024, 16, 4, 1, True).held > one.held
    assert decoder_memory(1024, 1024, 16, 4, 1, False).held == decoder_memory(1024, 1024, 1, 4, 1, False).held


def test_decoder_cure_names_a_size_that_fits_and_the_cheaper_settings():
    free = 9 * GIB
    cure = decoder_cure(8192, 8192, 1, 4, 8, True, free)
    side = int(cure.split("about ")[1].split("x")[0])
    assert side % 64 == 0 and decoder_memory(side, side, 1, 4, 8, True).for_images(1) <= free
    assert decoder_memory(side + 64, side + 64, 1, 4, 8, True).for_images(1) > free
    assert "passes to 1" in cure and "fewer images" not in cure
    # half precision needs less memory on an accelerator only (on the CPU torch's GroupNorm copies)
    assert "precision" not in cure and "precision to float16" in decoder_cure(8192, 8192, 1, 4, 8, False, free)
    lowest = decoder_cure(8192, 8192, 2, 2, 1, False, free)
    assert "precision" not in lowest and "passes" not in lowest and "fewer images at once" in lowest
    assert largest_square_side(1000.0, 0) == 0
