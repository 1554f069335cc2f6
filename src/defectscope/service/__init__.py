"""The inspection service: a FastAPI app over the library (API, dynamic batching, metrics, pages).

Needs the `serve` extra: pip install 'defectscope[serve]'. Entry points: `service.app.create_app`,
`service.models.load_served`, and the `defectscope serve` command.
"""
