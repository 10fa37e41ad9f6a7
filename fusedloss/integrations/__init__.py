"""Integrations with other libraries. Each submodule imports its library on import; this package imports
none of them, so ``import fusedloss`` never needs an optional dependency."""
