"""``vidloom serve``: the OpenAI Videos API over a durable job queue and one engine loop.

``app.create_app`` builds the FastAPI app, ``store`` keeps the jobs (SQLite), ``scheduler``
runs them, ``requests`` turns an API request into vidloom's.
"""
