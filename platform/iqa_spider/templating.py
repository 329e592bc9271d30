"""The one way the project's HTML pages (the evaluation and scoring reports) are rendered."""
from __future__ import annotations

import jinja2


def html_templates(package: str) -> jinja2.Environment:
    """The Jinja2 templates in ``package``'s ``templates/`` folder. Every value from the data
    (questions, answers, URIs, error texts) is escaped by the engine (autoescape), a name the
    template uses but the caller did not give is an error (StrictUndefined), and None shows as
    nothing."""
    return jinja2.Environment(loader=jinja2.PackageLoader(package, "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, finalize=lambda v: "" if v is None else v)


__all__ = ["html_templates"]
