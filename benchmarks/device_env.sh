# Sourced by the benchmarks/gpu_*.sh scripts on the lent GPU: FlashInfer from the wheels in .whl/ when
# they were carried (into /tmp/site, on PYTHONPATH), flashtree itself as an editable install.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
