"""`aqlmkit convert SRC -o DST`: validate and re-write (re-shard) an AQLM checkpoint, or dequantize it."""
from __future__ import annotations

from pathlib import Path

from aqlmkit.cli._common import add_overwrite_arg
from aqlmkit.dtypes import NAMES, dtype_name, parse_dtype
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("convert", help="validate + re-shard an AQLM checkpoint, or --dequantize it "
                                       "to a plain HF model")
    p.add_argument("src", help="AQLM checkpoint folder (aqlmkit or official/transformers)")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: new or empty (an aqlmkit output is replaced with --overwrite)")
    add_overwrite_arg(p)
    p.add_argument("--shard-size", default="5GB", help="max safetensors shard size (default 5GB)")
    p.add_argument("--dequantize", action="store_true",
                   help="write a plain (dense) HF model instead of an AQLM checkpoint")
    p.add_argument("--dtype", default=None, choices=list(NAMES),
                   help="float dtype of every tensor written (default: the source's, with unquantized "
                        "fp32 layers stored fp16; float16 with --dequantize)")
    p.set_defaults(func=run)


def _source_dtype(raw: dict) -> str:
    try:
        return dtype_name(parse_dtype(str(raw.get("dtype") or raw.get("torch_dtype") or "float16")))
    except AqlmkitError:
        return "float16"


def run(args) -> int:
    import torch

    from aqlmkit.formats import safetensors_io as st
    from aqlmkit.formats.aqlm_hf import load_quantized, read_config, save_quantized
    from aqlmkit.formats.output import CHECKPOINT, DENSE, check_output_dir, output_folder
    from aqlmkit.nn import dequantize_linears
    from aqlmkit.utils import fault_point

    src, dst = Path(args.src), Path(args.output)
    if not src.is_dir():
        raise AqlmkitError(f"{src} is not a folder: give an AQLM checkpoint folder")
    st.parse_size(args.shard_size)
    raw, scheme = read_config(src)
    kind = DENSE if args.dequantize else CHECKPOINT
    check_output_dir(dst, overwrite=args.overwrite, sources=[src], kind=kind)  # before the slow load
    dtype = args.dtype or ("float16" if args.dequantize else _source_dtype(raw))
    # An explicit --dtype (and --dequantize) means every float tensor in that dtype; otherwise 16-bit
    # dense layers stay 16-bit and fp32 ones are stored fp16, as save_quantized does by default.
    as_given = args.dequantize or args.dtype is not None
    model, tok = load_quantized(src, device="cpu", dtype=dtype,  # validates every tensor
                                half_dense=False if as_given else None)
    fault_point("convert:loaded")
    if args.dequantize:
        names = dequantize_linears(model)
        del model.config.quantization_config
        with output_folder(dst, overwrite=args.overwrite, sources=[src], kind=kind) as tmp:
            model.save_pretrained(tmp, max_shard_size=args.shard_size)
            if tok is not None:
                tok.save_pretrained(tmp)
        print(f"dequantized {len(names)} {scheme.name} layers -> {dst} ({dtype})")
        return 0
    save_quantized(model, tok, dst, scheme, card={"converted_from": src.name},
                   max_shard_size=args.shard_size, dense_dtype=None if as_given else torch.float16,
                   overwrite=args.overwrite)
    print(f"validated and re-wrote {src} -> {dst} ({scheme.name}, {dtype}, shards <= {args.shard_size})")
    return 0
