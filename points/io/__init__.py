"""Files in and out: config.json (`config`), safetensors checkpoints and the one name mapping (`checkpoint`),
the image processor (`processor`), the tokenizer (`tokenizer`), the chat template (`chat`), and the progress
display of long reads and writes (`progress`)."""

from points import submodules

__getattr__ = submodules(__name__)  # `points.io.NAME` imports the module NAME on first use
