"""QoS classes and admission (``admission.py``)."""
