"""The pure layer engine: snapshot -> diff -> tar -> compress+digest, plus chain identity."""
