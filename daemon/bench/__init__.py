"""`kioskd bench`: the benchmarks (docs/benchmarks.md); the runtime never imports this package.

`harness` starts a private broker and daemons and asks them; one module per benchmark, each with
its typed result (dataclasses); `results` records how a run was made and writes a result as
JSON; `report` prints and draws results. `localbroker` (a private mosquitto) and `synth` (a
GGUF synthesiser) serve the benchmarks and the tests.
"""
