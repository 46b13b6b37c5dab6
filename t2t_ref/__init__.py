"""t2t_ref: a reference T2T-ViT with hand-written forward and backward passes.

    import t2t_ref
    model = t2t_ref.create_model("t2t_vit_7", img_size=64, num_classes=10)
    logits = model.forward(images)        # (B, 10)
    loss, dlogits = t2t_ref.cross_entropy(logits, labels, smoothing=0.1)
    model.backward(dlogits)               # fills model.grads
    model = t2t_ref.load_pretrained("71.7_T2T_ViT_7.pth.tar", "t2t_vit_7")  # official weights
    print(t2t_ref.summary("t2t_vit_14_se"))   # parameters and MACs, stage by stage
"""

import warnings

from .cli import guard_loading

guard_loading()  # first: `python -m t2t_ref...` interrupted while it loads says so in one line

from .backend import get_namespace, to_device, to_numpy  # noqa: E402
from .model import T2TViT, create_model  # noqa: E402
from .ops.cross_entropy import cross_entropy  # noqa: E402
from .pretrained import load_pretrained  # noqa: E402
from .summary import count, summary, summary_rows  # noqa: E402
from .variants import Variant, list_models  # noqa: E402

__all__ = ["T2TViT", "create_model", "list_models", "Variant", "cross_entropy", "get_namespace",
           "to_device", "to_numpy", "load_pretrained", "summary", "summary_rows", "count"]
__version__ = "0.1.0"

# `python -m t2t_ref.summary` runs a module that this package has already imported above (for
# its functions), and Python warns on every run of the command that the module is executed
# twice; harmless here (it only defines functions and tables), so the warning is filtered.
warnings.filterwarnings("ignore", message="'t2t_ref.summary' found in sys.modules",
                        category=RuntimeWarning)
