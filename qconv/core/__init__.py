"""Types shared by every package of qconv (readers, runner, methods, writers): the integer weight
grid and the quantized-weight and activation-scheme records. This package imports nothing else
of qconv but :mod:`qconv.errors`, so every other package can depend on it without cycles."""
