"""fusedloss: fused loss kernels for PyTorch (CUDA, Triton and CPU backends, one pure-PyTorch reference)."""

__version__ = "0.1.0"

from fusedloss import backends, ops, reference  # noqa: E402  (ops registers the torch.library ops)
from fusedloss import distributed, functional, nn  # noqa: E402  (distributed: no process group needed to import)
from fusedloss.backends import info  # noqa: E402
from fusedloss.compose import ComposedLoss, build_loss, register_loss  # noqa: E402
from fusedloss.functional import cross_entropy, focal_loss, gap_loss, info_nce, linear_cross_entropy  # noqa: E402
from fusedloss.functional import jsd_logits, kl_div_logits, linear_jsd, linear_kl_div  # noqa: E402
from fusedloss.functional import siglip_loss  # noqa: E402

__all__ = ["ComposedLoss", "__version__", "backends", "build_loss", "cross_entropy", "distributed", "focal_loss",
           "functional", "gap_loss", "info", "info_nce", "jsd_logits", "kl_div_logits", "linear_cross_entropy",
           "linear_jsd", "linear_kl_div", "nn", "reference", "register_loss", "siglip_loss"]
