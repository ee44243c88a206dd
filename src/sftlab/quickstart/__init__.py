"""Building blocks of the quickstart: a real small chat model and a structured-output task it lacks."""
