"""`sdxl_train_network.py` for tests/test_msrun.py, with two test-only hooks. Not collected by pytest.

    python tests/msrun_train_worker.py DUMP_DIR <sdxl_train_network flags>     (or the same under msrun)

- Shared noise: every sample of a step gets the same noise and the same timestep, drawn from (1234, number of
  the draw). A run of N ranks x batch b then sees exactly the noise and timesteps of one process x batch N*b on
  the same samples, whichever rank or batch slot a sample lands in, so the two runs must train the same weights.
  (The real NoiseSampler gives each rank its own stream, as it should.)
- Dump: after training, every rank writes its LoRA weights to DUMP_DIR/rank<r>.safetensors (outside the output
  directory, where only rank 0 writes).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import numpy as np  # noqa: E402

import sdxl_train_network  # noqa: E402
from library import distributed, train_util  # noqa: E402
from library.noise_sampling import NoiseSampler  # noqa: E402


def shared_noise_draw(self, latent_shape):
    assert self.fields == ("noise", "timesteps"), "the shared-noise hook covers noise and timesteps only"
    b, c, h, w = latent_shape
    self.test_draws = getattr(self, "test_draws", 0) + 1
    rng = np.random.default_rng([1234, self.test_draws])
    noise = rng.standard_normal((1, c, h, w), dtype=np.float32)
    timestep = rng.integers(self.min_timestep, max(self.max_timestep, self.min_timestep + 1))
    return np.repeat(noise, b, axis=0), np.full((b,), timestep, dtype=np.int32)


def main(argv):
    dump_dir, train_argv = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    NoiseSampler.draw = shared_noise_draw
    parser = sdxl_train_network.setup_parser()
    args = train_util.read_config_from_file(parser.parse_args(train_argv), parser, train_argv)
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    trainer.train(args)  # under msrun, the scheduler process ends inside train()
    os.makedirs(dump_dir, exist_ok=True)
    trainer.network.save_weights(os.path.join(dump_dir, f"rank{distributed.get_state().rank}.safetensors"), None, {})


if __name__ == "__main__":
    main(sys.argv[1:])
