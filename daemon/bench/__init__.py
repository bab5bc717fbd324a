"""`kioskd bench`: the benchmarks (docs/benchmarks.md); the runtime never imports this package.

`harness` starts a private broker and daemons and asks them; one module per benchmark; `results`
holds their typed figures and `report` prints and draws them. `localbroker` (a private mosquitto)
and `synth` (a GGUF synthesiser) serve the benchmarks and the tests.
"""
