"""Translation between OpenAI's Chat Completions API and Anthropic's Messages API, sans I/O.

Theory of operation. When a client's API and its target provider's kind differ, four things
cross the gap, each in both directions, and each has a module here:

- the request (`request_to_anthropic`, `request_to_openai`): dict in, dict out, or BadRequest
  naming the field that cannot be translated;
- a whole answer (`answers`): the upstream's JSON object in, the client's out;
- a stream (`stream_to_openai`, `stream_to_anthropic`): a stateful translator fed the upstream's
  bytes however they were cut into blocks, giving the client's events, and the usage it saw;
- an error (`errors`): the upstream's status and body in, the client's status and body out.

What each request field becomes, and why, is one table (`table`): the request translators
enforce its drops and refusals, and the README's translation table is generated from it. Nothing
is silently wrong: a field is mapped, dropped for a written reason (it asks for nothing the
answer could show), or refused with 400.

`count_tokens` answers Anthropic's count_tokens for a target that cannot, with the token
limiter's estimate. Nothing here does I/O or keeps state between requests.
"""
