"""Running the model: which attention kernel (`attention`: the measured rule), the next-token rule
(`sampling`), the engine that prefills and steps, eager or compiled (`engine`), the vision runner
(`vision`), the prefix cache (`prefix`), weight-only int8 and int4 (`quantize`), what each linear layer becomes
(`linears`: the one plan; `cpu_linear`, `cpu_blocks`, `layout`) and text generation over them (`generation`)."""

from points import submodules

__getattr__ = submodules(__name__)  # `points.runtime.NAME` imports the module NAME on first use
