"""History buffer of generated volumes that feeds the discriminators (Shrivastava et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ImagePool"]


class ImagePool:
    """Buffer of previously generated volumes, so a discriminator also sees older fakes.

    From Shrivastava et al., "Learning from Simulated and Unsupervised Images through Adversarial
    Training" (CVPR 2017), as used by CycleGAN (``util/image_pool.py``) and by Lim et al. 2020
    (a buffer of 50 generated volumes). Until the pool is full, every queried volume is stored and
    returned unchanged; afterwards each volume, with probability 0.5, is swapped with a random
    stored one (the stored one is returned, the new one takes its place), otherwise it is
    returned unchanged.

    The stored volumes live on the CPU (detached); returned volumes are moved to the query's
    device and dtype. The random choices come from a private ``torch.Generator``, and
    :meth:`state_dict` / :meth:`load_state_dict` save the buffer and the generator state, so a
    resumed training continues with exactly the same sequence (pass the pool to MONAI's
    ``CheckpointSaver``/``CheckpointLoader`` like any other object with a state dict).

    Args:
        pool_size: number of stored volumes; ``0`` disables the buffer (queries pass through).
        seed: seed of the private generator; ``None`` draws one from torch's global generator
            (so ``monai.utils.set_determinism`` makes it reproducible).
        generator: a ``torch.Generator`` (CPU) to use instead of ``seed``.

    Example::

        >>> pool = ImagePool(pool_size=50, seed=0)
        >>> fake_for_d = pool.query(fake_sharp.detach())  # (B, 1, D, H, W) -> (B, 1, D, H, W)
    """

    def __init__(
        self, pool_size: int = 50, seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.pool_size = int(pool_size)
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(int(seed))
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch drawn from the history, updating it with ``images``.

        Args:
            images: ``(B, ...)`` batch of generated volumes, e.g. ``(B, 1, D, H, W)``.

        Returns:
            ``(B, ...)`` detached tensor on the device and with the dtype of ``images`` (``images``
            itself when ``pool_size`` is 0).
        """
        if self.pool_size == 0:
            return images
        returned: list[torch.Tensor] = []
        for image in images.detach():
            cpu_image = image.to("cpu", copy=True)
            if len(self.images) < self.pool_size:
                self.images.append(cpu_image)
                returned.append(image)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                idx = int(torch.randint(0, self.pool_size, (), generator=self.generator).item())
                returned.append(self.images[idx].to(device=images.device, dtype=images.dtype))
                self.images[idx] = cpu_image
            else:
                returned.append(image)
        return torch.stack(returned, dim=0)

    def state_dict(self) -> dict[str, Any]:
        """Pool contents (CPU tensors) and the generator state."""
        return {
            "pool_size": self.pool_size,
            "images": [im.clone() for im in self.images],
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the pool size must match)."""
        if int(state_dict["pool_size"]) != self.pool_size:
            raise ValueError(
                f"pool_size mismatch: checkpoint has {state_dict['pool_size']}, pool has {self.pool_size}"
            )
        self.images = [im.detach().to("cpu").clone() for im in state_dict["images"]]
        self.generator.set_state(state_dict["generator_state"])
