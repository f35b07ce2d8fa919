"""Write a GGUF file with the first few layers of another, tensors copied as they are (still quantized).

The device machine takes at most 64 MiB of files, and the one real GGUF file
(SmolLM2-135M-Instruct, Q4_1) is 98 MB; its first layers, with the same
tokenizer, chat template and quantization types, fit.  The result is a
smaller model of the same architecture: its text is poor, but kvpage must
load it and match transformers on it exactly as on the whole model.

    python benchmarks/small_gguf.py IN.gguf OUT.gguf --layers 4
"""

from __future__ import annotations

import argparse
import re

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def shrink(source: str, target: str, layers: int) -> None:
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        value = layers if name == f"{arch}.block_count" else field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    kept = [t for t in reader.tensors
            if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    shrink(args.source, args.target, args.layers)
