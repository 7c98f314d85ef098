// One control-plane cycle through the AWS SDK for Go v2, as Terraform's AWS provider drives it:
// create -> wait for ACTIVE -> put -> describe -> update with the version id -> delete, and the
// error types it must parse. Prints one JSON line of what it saw; exits 1 on any surprise.
// Built offline from Debian's golang-github-aws-aws-sdk-go-v2-dev (GO111MODULE=off).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/firehose"
	"github.com/aws/aws-sdk-go-v2/service/firehose/types"
	"github.com/aws/smithy-go"
)

func client(akid, secret string, attempts int) *firehose.Client {
	return firehose.New(firehose.Options{
		Region:           "us-east-1",
		Credentials:      credentials.NewStaticCredentialsProvider(akid, secret, ""),
		EndpointResolver: firehose.EndpointResolverFromURL(os.Getenv("ENDPOINT")),
		RetryMaxAttempts: attempts,
	})
}

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	ctx := context.Background()
	admin := client(os.Getenv("AKID"), os.Getenv("SECRET"), 3)
	once := client(os.Getenv("AKID"), os.Getenv("SECRET"), 1)
	name := os.Getenv("STREAM")
	bucket := os.Getenv("BUCKET")
	seen := map[string]string{}
	describe := func() (*types.DeliveryStreamDescription, error) {
		out, err := admin.DescribeDeliveryStream(ctx, &firehose.DescribeDeliveryStreamInput{DeliveryStreamName: aws.String(name)})
		if err != nil {
			return nil, err
		}
		return out.DeliveryStreamDescription, nil
	}

	created, err := admin.CreateDeliveryStream(ctx, &firehose.CreateDeliveryStreamInput{
		DeliveryStreamName: aws.String(name),
		DeliveryStreamType: types.DeliveryStreamTypeDirectPut,
		ExtendedS3DestinationConfiguration: &types.ExtendedS3DestinationConfiguration{
			RoleARN:        aws.String("arn:aws:iam::000000000000:role/firehose"),
			BucketARN:      aws.String("arn:aws:s3:::" + bucket),
			Prefix:         aws.String(name + "/"),
			BufferingHints: &types.BufferingHints{SizeInMBs: aws.Int32(1), IntervalInSeconds: aws.Int32(1)},
		},
	})
	if err != nil {
		fail("create", err)
	}
	seen["arn"] = aws.ToString(created.DeliveryStreamARN)
	for i := 0; i < 100; i++ {
		d, err := describe()
		if err != nil {
			fail("describe", err)
		}
		seen["status"] = string(d.DeliveryStreamStatus)
		if d.DeliveryStreamStatus == types.DeliveryStreamStatusActive {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var records []types.Record
	for n := 0; n < 3; n++ {
		records = append(records, types.Record{Data: []byte(fmt.Sprintf("{\"n\": %d}\n", n))})
	}
	put, err := admin.PutRecordBatch(ctx, &firehose.PutRecordBatchInput{DeliveryStreamName: aws.String(name), Records: records})
	if err != nil {
		fail("put", err)
	}
	seen["failedPutCount"] = fmt.Sprint(aws.ToInt32(put.FailedPutCount))
	d, err := describe()
	if err != nil {
		fail("describe", err)
	}
	update := func(version, prefix string) error {
		_, err := admin.UpdateDestination(ctx, &firehose.UpdateDestinationInput{
			DeliveryStreamName:             aws.String(name),
			CurrentDeliveryStreamVersionId: aws.String(version),
			DestinationId:                  aws.String("destinationId-000000000001"),
			ExtendedS3DestinationUpdate:    &types.ExtendedS3DestinationUpdate{Prefix: aws.String(prefix)},
		})
		return err
	}
	var concurrent *types.ConcurrentModificationException
	if err := update("99", "v2/"); errors.As(err, &concurrent) {
		seen["stale"] = "ConcurrentModificationException"
	} else {
		seen["stale"] = fmt.Sprintf("not parsed: %v", err)
	}
	if err := update(aws.ToString(d.VersionId), name+"-v2/"); err != nil {
		fail("update", err)
	}
	if d, err = describe(); err != nil {
		fail("describe", err)
	}
	seen["versionAfterUpdate"] = aws.ToString(d.VersionId)
	_, err = admin.CreateDeliveryStream(ctx, &firehose.CreateDeliveryStreamInput{
		DeliveryStreamName: aws.String(name),
		S3DestinationConfiguration: &types.S3DestinationConfiguration{
			RoleARN: aws.String("r"), BucketARN: aws.String("arn:aws:s3:::" + bucket)},
	})
	var inUse *types.ResourceInUseException
	if errors.As(err, &inUse) {
		seen["duplicate"] = "ResourceInUseException"
	} else {
		seen["duplicate"] = fmt.Sprintf("not parsed: %v", err)
	}
	limited := client(os.Getenv("LIMITED_AKID"), os.Getenv("LIMITED_SECRET"), 1)
	_, err = limited.PutRecord(ctx, &firehose.PutRecordInput{DeliveryStreamName: aws.String(name), Record: &types.Record{Data: []byte("x")}})
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		seen["denied"] = apiErr.ErrorCode() // not in Firehose's model: a generic error with that code
	} else {
		seen["denied"] = fmt.Sprintf("not parsed: %v", err)
	}
	time.Sleep(1100 * time.Millisecond)
	// More than 5 control-plane calls at once: some are refused with LimitExceededException
	// (CreateDeliveryStream declares it; the bucket is invalid, so none creates a stream).
	seen["limit"] = "not seen"
	limits := make(chan bool, 12)
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := once.CreateDeliveryStream(ctx, &firehose.CreateDeliveryStreamInput{
				DeliveryStreamName: aws.String("never-created"),
				S3DestinationConfiguration: &types.S3DestinationConfiguration{
					RoleARN: aws.String("r"), BucketARN: aws.String("arn:aws:s3:::Not_A_Bucket")},
			})
			var limit *types.LimitExceededException
			limits <- errors.As(err, &limit)
		}()
	}
	wg.Wait()
	close(limits)
	for hit := range limits {
		if hit {
			seen["limit"] = "LimitExceededException"
		}
	}
	time.Sleep(1100 * time.Millisecond)
	if _, err := admin.DeleteDeliveryStream(ctx, &firehose.DeleteDeliveryStreamInput{DeliveryStreamName: aws.String(name)}); err != nil {
		fail("delete", err)
	}
	seen["deleted"] = "not seen"
	for i := 0; i < 100; i++ {
		_, err := describe()
		var notFound *types.ResourceNotFoundException
		if errors.As(err, &notFound) {
			seen["deleted"] = "ResourceNotFoundException"
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, _ := json.Marshal(seen)
	fmt.Println(string(out))
}
