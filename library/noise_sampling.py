"""Random draws of a training step, made on the host with a seeded numpy generator.

Noise, timesteps and the extra draws of --noise_offset, --multires_noise_iterations and --ip_noise_gamma are
drawn here and passed to the compiled train step as inputs, where `DiffusionNoiseAndLoss` turns them into
noisy latents. Drawing on the host rather than with MindSpore's in-graph random ops makes them:
- resumable: the generator state goes into `--save_state`, so a resumed run draws what the uninterrupted run
  would have drawn (in-graph random kernels restart their streams in a new process);
- per rank: each data-parallel rank gets its own stream from (seed, rank).

`draw(latent_shape)` returns a tuple whose layout depends only on the flags (see `NoiseSampler.fields`).
"""

import numpy as np

from library.custom_train_functions import NUM_TRAIN_TIMESTEPS, pyramid_level_sizes


class NoiseSampler:
    def __init__(self, args, seed: int, rank: int = 0):
        self.min_timestep = 0 if args.min_timestep is None else int(args.min_timestep)
        self.max_timestep = NUM_TRAIN_TIMESTEPS if args.max_timestep is None else int(args.max_timestep)
        self.noise_offset = bool(args.noise_offset)
        self.noise_offset_random_strength = bool(args.noise_offset_random_strength)
        self.multires_noise_iterations = int(args.multires_noise_iterations or 0)
        self.ip_noise_gamma = bool(args.ip_noise_gamma)
        self.ip_noise_gamma_random_strength = bool(args.ip_noise_gamma_random_strength)
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))

    @property
    def fields(self):
        """Names of the drawn arrays, in order."""
        names = ["noise", "timesteps"]
        if self.noise_offset:
            names += ["offset_noise", "offset_strength"]
        if self.multires_noise_iterations:
            names += ["multires_scales"] + [f"multires_level{i}" for i in range(self.multires_noise_iterations)]
        if self.ip_noise_gamma:
            names += ["ip_noise", "ip_strength"]
        return tuple(names)

    @property
    def per_sample(self):
        """For each field, whether its first axis is the batch (the strengths and pyramid scales are per step)."""
        return tuple(not name.endswith(("_strength", "_scales")) for name in self.fields)

    def draw(self, latent_shape):
        b, c, h, w = latent_shape
        normal = self.rng.standard_normal
        draws = [normal((b, c, h, w), dtype=np.float32), self._timesteps(b)]
        if self.noise_offset:
            strength = self.rng.random(1, dtype=np.float32) if self.noise_offset_random_strength else np.ones(1, np.float32)
            draws += [normal((b, c, 1, 1), dtype=np.float32), strength]
        if self.multires_noise_iterations:
            # r ~ U(2, 4) per level, as upstream's random.random() * 2 + 2
            draws.append((self.rng.random(self.multires_noise_iterations, dtype=np.float32) * 2 + 2).astype(np.float32))
            draws += [normal((b, c) + size, dtype=np.float32)
                      for size in pyramid_level_sizes(h, w, self.multires_noise_iterations)]
        if self.ip_noise_gamma:
            strength = self.rng.random(1, dtype=np.float32) if self.ip_noise_gamma_random_strength else np.ones(1, np.float32)
            draws += [normal((b, c, h, w), dtype=np.float32), strength]
        return tuple(draws)

    def _timesteps(self, batch_size):
        if self.min_timestep >= self.max_timestep:
            return np.full((batch_size,), self.max_timestep, dtype=np.int32)
        return self.rng.integers(self.min_timestep, self.max_timestep, size=batch_size, dtype=np.int32)

    def state_dict(self):
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["bit_generator"]


# tag of the fixed draws' seed sequences ("VALI"): keeps them apart from every NoiseSampler stream of the same seed
_FIXED_DRAWS_TAG = 0x56414C49


class FixedTimestepNoise:
    """Draws for an evaluation that must repeat exactly (the validation loss): the layout of `NoiseSampler.draw`
    for the same flags, with every timestep set to the one given and the random arrays a function of
    (seed, batch index, timestep) alone.

    Each call builds a generator of its own from those three numbers, so the draws do not depend on what was
    drawn before, on how many batches an evaluation runs, or on any global random state, and drawing them leaves
    the training `NoiseSampler`'s stream (and numpy's, Python's and MindSpore's global generators) untouched.
    """

    def __init__(self, args, seed: int):
        self.seed = int(seed) % 2**64  # SeedSequence takes non-negative integers
        self._layout = NoiseSampler(args, seed=self.seed)  # the flags; its own stream is never used

    @property
    def fields(self):
        return self._layout.fields

    @property
    def per_sample(self):
        return self._layout.per_sample

    def draw(self, latent_shape, batch_index: int, timestep: int):
        sampler = NoiseSampler.__new__(NoiseSampler)
        sampler.__dict__.update(self._layout.__dict__)
        sampler.min_timestep = sampler.max_timestep = int(timestep)  # NoiseSampler then fills every sample with it
        sequence = np.random.SeedSequence(self.seed, spawn_key=(_FIXED_DRAWS_TAG, int(batch_index), int(timestep)))
        sampler.rng = np.random.Generator(np.random.PCG64(sequence))
        return sampler.draw(latent_shape)
