"""The OpenAI wire: the HTTP routes, the request models (the one place where a request is validated, for every
route and for the batch job `serving.batch`: a request that passes holds only values the engine can hold,
docs/server.md "Limits"), the error shape and the answer bodies.

* api/                  the HTTP routes, one module per API, and what they share (the guard, the pump, the SSE
                        writer, delivery); `serving.app.create_app` wires them
* errors.py             the OpenAI error (`APIError`, its body, any exception or validation error as one)
* fields.py             the limits and the field rules every request model shares, the base models
* requests.py           chat completions, completions, /tokenize and /detokenize requests
* responses_request.py  the Responses API request
* parse.py              `parse_request(Model, body, vocab_size=...)`
* logprobs.py           logprobs in OpenAI's shapes
* bodies.py             the answer bodies shared by the server and the batch job (chat.completion, usage, error)
* chat_output.py        a chat request's plan and how its choices' output is read (tool calls, reasoning)
* parsers/              the tool-call and reasoning parsers chat_output.py reads the output with
"""
