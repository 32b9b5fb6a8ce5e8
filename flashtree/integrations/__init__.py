"""Integrations with other libraries, through their public APIs only.

- :mod:`flashtree.integrations.hf`: the ``"flashtree"`` attention implementation for HF transformers models
  (packed DFS-ordered trees), and the model inputs for packed prompt + responses trees. Imported on demand:
  ``from flashtree.integrations import hf`` (transformers is optional).
"""
