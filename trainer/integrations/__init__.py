"""trainhealth's callbacks for the training frameworks (``trainhealth.integrations``).

- ``trainhealth.integrations.hf``: ``TrainHealthCallback`` for the Hugging Face ``transformers`` Trainer
  (``pip install 'trainhealth[hf]'``).
- ``trainhealth.integrations.lightning``: ``TrainHealthCallback`` for Lightning
  (``pip install 'trainhealth[lightning]'``).

Import the module of your framework: this package imports neither, and each module imports only its own.
"""
