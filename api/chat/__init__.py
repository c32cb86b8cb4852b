"""The OpenAI Chat Completions wire format: requests in (also the form every other front end
translates into), job events out as completion bodies and stream chunks."""
