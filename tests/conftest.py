import os
import sys

# must be set before mindspore is imported: on AVX-512 CPUs MindSpore's oneDNN otherwise falls back to a
# reference convolution that is ~100x slower (see DESIGN.md)
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

# asynchronous PyNative on CPU is ~10x slower for our small ops (see DESIGN.md)
ms.set_context(pynative_synchronize=True)
