"""Seeded Gaussian noise whose i-th sample does not depend on how the samples are batched.

Guarantee: for a :class:`NoiseSource` with a given ``(sigma, seed, chunk_size, device)``, sample
``i`` of ``(image_key, stream)`` is bit-for-bit the same tensor however the range ``0..n-1`` is
cut into calls of :meth:`NoiseSource.sample` (batch size 1, 7, 400 or one call for all ``n``),
in whatever order the calls come, and in whichever process.

How: the sample axis of every ``(image_key, stream)`` is cut into fixed chunks of
``chunk_size`` samples. Chunk ``c`` is drawn in one ``torch.randn(chunk_size, *shape,
generator=g)`` call from a fresh :class:`torch.Generator` whose seed is derived from
``(seed, image_key, stream, c)`` with :class:`numpy.random.SeedSequence` (a well-mixed hash,
so neighbouring keys give unrelated streams). A request for samples ``start .. start+count-1``
generates the chunks it touches and slices them; a small LRU cache keeps the last chunks so
consecutive batches that straddle a chunk boundary do not regenerate it.

Streams used by the certification engine: 0 = selection (the ``n0`` samples that pick the
candidate class), 1 = estimation (the ``n`` samples that bound its probability; incremental
certification regenerates samples ``0..n_p-1`` of this stream), 2 = fresh samples for the
plain-certification branch of incremental certification, 3 = PREDICT.

The values depend on the generator's device type (the CPU and CUDA generators use different
algorithms), so a certification cache records :attr:`NoiseSource.scheme`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

STREAM_SELECTION = 0
STREAM_ESTIMATION = 1
STREAM_FRESH = 2
STREAM_PREDICT = 3

DEFAULT_CHUNK = 256


class NoiseSource:
    """Gaussian noise ``N(0, sigma^2 I)`` addressed by ``(image_key, stream, sample index)``.

    Args:
        sigma: standard deviation in [0, 1] pixel units (> 0).
        seed: non-negative integer seed of the whole certification.
        chunk_size: samples per independently seeded chunk (part of the identity of the noise).
        device: device of the generator ("cpu" default; "cuda" is faster on a GPU but gives
            other values). Samples are returned on this device.
        cache_chunks: how many generated chunks to keep for reuse.
    """

    def __init__(
        self,
        sigma: float,
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK,
        device: str | torch.device = "cpu",
        cache_chunks: int = 8,
    ):
        sigma = float(sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a positive finite number, got {sigma}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.sigma = sigma
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.device = torch.device(device)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_chunks = int(cache_chunks)

    @property
    def scheme(self) -> str:
        """A string identifying how the values are generated (stored in caches)."""
        return f"torch-randn/{self.device.type}/seedsequence/chunk{self.chunk_size}"

    def chunk_seed(self, image_key: int, stream: int, chunk: int) -> int:
        """The 64-bit generator seed of one chunk."""
        ss = np.random.SeedSequence([self.seed, int(image_key), int(stream), int(chunk)])
        return int(ss.generate_state(1, dtype=np.uint64)[0])

    def _chunk(
        self, image_key: int, stream: int, chunk: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        key = (image_key, stream, chunk, shape)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.chunk_seed(image_key, stream, chunk))
        out = torch.randn((self.chunk_size, *shape), generator=gen, device=self.device)
        self._cache[key] = out
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return out

    def standard(
        self, image_key: int, stream: int, start: int, count: int, shape: Sequence[int]
    ) -> torch.Tensor:
        """Samples ``start .. start+count-1`` of N(0, I) (not scaled by sigma)."""
        image_key, stream, start, count = int(image_key), int(stream), int(start), int(count)
        if image_key < 0 or stream < 0 or start < 0 or count < 0:
            raise ValueError("image_key, stream, start and count must be non-negative")
        shape = tuple(int(s) for s in shape)
        if count == 0:
            return torch.empty((0, *shape), device=self.device)
        cs = self.chunk_size
        first, last = start // cs, (start + count - 1) // cs
        parts = []
        for c in range(first, last + 1):
            lo = max(start, c * cs) - c * cs
            hi = min(start + count, (c + 1) * cs) - c * cs
            parts.append(self._chunk(image_key, stream, c, shape)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sample(
        self, image_key: int, stream: int, start: int, count: int, shape: Sequence[int]
    ) -> torch.Tensor:
        """Noise samples ``start .. start+count-1`` of ``(image_key, stream)``: ``[count, *shape]``.

        Each sample is ``sigma`` times a standard normal tensor; the result is the same for
        every way of splitting a range into calls (see the module docstring).
        """
        return self.standard(image_key, stream, start, count, shape) * self.sigma

    def __repr__(self) -> str:
        return f"NoiseSource(sigma={self.sigma}, seed={self.seed}, scheme={self.scheme!r})"
