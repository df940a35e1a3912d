#!/usr/bin/env python3
"""lmms-eval's OpenAI-compatible model (`--model openai`) against `points serve`, one question, to see what it
sends: its greedy reply against `Pipeline.chat` with the text before the image (lmms-eval's order) and with the
image before the text (VLMEvalKit's POINTS wrapper's order).

    pip install --no-deps lmms-eval==0.7.3 accelerate python-dotenv loguru pytz evaluate datasets multiprocess \
        pyarrow dill xxhash          # (a side environment: its full dependency list pulls torchvision)
    python tools/try_lmms_eval.py --model DIR

Not a test (lmms-eval is not among the test dependencies); README's Evaluate section quotes its result.
"""

import argparse
import io
import os
import re
import subprocess
import sys
import time

from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint directory (a random tiny float32 one will do)")
    p.add_argument("--port", type=int, default=8731)
    args = p.parse_args(argv)
    server = subprocess.Popen([sys.executable, "-m", "points", "serve", "--model", args.model, "--port",
                               str(args.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, start = None, time.time()
        while url is None and time.time() - start < 120:
            found = re.search(r"http://[0-9.:]+", server.stdout.readline())
            url = found.group(0) if found else None
        from lmms_eval.api.instance import Instance
        from lmms_eval.models.simple.openai import OpenAICompatible

        import points

        client = OpenAICompatible(model_version=os.path.basename(os.path.abspath(args.model)), base_url=url + "/v1",
                                  api_key="none", timeout=120)
        image = Image.new("RGB", (120, 90), (200, 40, 60))
        client.task_dict = {"task": {"val": [{"image": image}]}}
        context = ("What colour is the picture?\nA. red\nB. blue\n"
                   "Answer with the option's letter from the given choices directly.")
        request = Instance(request_type="generate_until", idx=0, metadata={"task": "task", "doc_id": 0, "repeats": 1},
                           arguments=(context, {"max_new_tokens": 8, "temperature": 0}, lambda doc: [doc["image"]], 0,
                                      "task", "val"))
        reply = client.generate_until([request])[0]
        reply = getattr(reply, "text", reply)
        pipe = points.load(args.model)
        png = io.BytesIO()
        image.save(png, format="PNG")  # (lmms-eval sends a PNG: the same pixels)
        text_first = [{"type": "text", "text": context}, {"type": "image", "image": png.getvalue()}]
        for name, content in (("text then image (lmms-eval's)", text_first),
                              ("image then text (the wrapper's)", text_first[::-1])):
            ours = pipe.chat([{"role": "user", "content": content}], max_new_tokens=8)
            print(f"Pipeline.chat, {name}: {ours!r}; equal to lmms-eval's reply {reply!r}: {ours == reply}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
