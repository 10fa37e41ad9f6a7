"""Op registrations (fake kernels, Triton twins, autograd). Importing a module registers its op."""
from fusedloss.ops import cross_entropy, focal_loss, gap_loss, info_nce, kl_div, linear_cross_entropy, linear_kl_div  # noqa: F401
from fusedloss.ops import siglip  # noqa: F401
