from tests.node.test_ollama import *
async def test_probe(fake):
    fake.drop_after = 3
    async with backend(fake) as b:
        texts, error = await stream_until_error(b, params())
    print("DROP:", repr(error), repr(error.__cause__))
    fake.drop_after=None; fake.first_line_delay=5
    async with backend(fake, timeout=0.3) as b:
        texts, error = await stream_until_error(b, params())
    print("SLOW:", repr(error), repr(error.__cause__))
