"""A reduced chat template in the shape of Qwen3-Coder's (tools listed as XML, calls written as
`<function=...>` / `<parameter=...>`), for tests: the real one ships with the model's tokenizer."""

QWEN3_CODER_TEMPLATE = r"""
{%- for message in messages %}
{%- if message.role == "system" %}
{{- '<|im_start|>system\n' + message.content }}
{%- if tools %}
{{- '\n\n# Tools\n\n<tools>' }}
{%- for tool in tools %}{% set f = tool.function if tool.function is defined else tool %}
{{- '\n<function>\n<name>' + f.name + '</name>' }}
{%- for pname, p in (f.parameters.properties if f.parameters is defined else {}).items() %}
{{- '\n<parameter>\n<name>' + pname + '</name>\n<type>' + (p.type | string) }}
{{- '</type>\n</parameter>' }}
{%- endfor %}
{{- '\n</function>' }}
{%- endfor %}
{{- '\n</tools>\n\nTo call a function reply:\n<tool_call>\n<function=example_function_name>\n'
    '<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>assistant\n' + (message.content or '') }}
{%- for tc in message.tool_calls or [] %}
{%- set tc = tc.function if tc.function is defined else tc %}
{{- '\n<tool_call>\n<function=' + tc.name + '>\n' }}
{%- for k, v in tc.arguments.items() %}
{{- '<parameter=' + k + '>\n' + (v if v is string else v | tojson) + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
