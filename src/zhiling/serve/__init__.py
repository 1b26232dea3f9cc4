"""Serving: the OpenAI-compatible HTTP API (``app``) and the Gradio web chat (``webui``), both on the
inference engine interface (``zhiling.infer.engine``)."""
