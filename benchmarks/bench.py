"""`secfwt bench` as a script: see secfwt_jax/compile/bench.py (compile/bench.py).

    .venv/bin/python benchmarks/bench.py --shapes bert-base --seqs 128 --protocols ABY3 \\
        --rows forward_softmax forward_rfa --out benchmarks/results/bench
"""

from secfwt_jax.compile.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
